"""Pre-training data loading: webdataset shards (dataset/shards.py) against one image file per
sample (dataset/pretrain_dataset.py), the same samples, same machine, same run.

Synthetic pre-training pairs (JPEG files of --image_size pixels) are written once with their
shards (tools/write_shards.py); then each source is read for whole epochs through the training
loader (dataset/loaders.py train_loader, --workers loader workers, batches of --batch), the two
interleaved --repeats times, twice: with the pre-training transform at --image_res (what
training pays) and with a transform that only decodes (what the storage format changes). Prints
samples per second (the best of the repeats) of both and their ratio. The files are read warm,
from the page cache, after a first untimed pass: on network file systems, where every file open
is a request, the gap is wider than here.

    python -m benchmarks.loader_shards --samples 2000 --image_size 256 --workers 2
"""
import argparse
import os
import tempfile
import time

import torch

from dataset.faults import BadSamplePolicy
from dataset.loaders import train_loader
from dataset.pretrain_dataset import pretrain_dataset
from dataset.shards import PretrainShards
from dataset.synthetic import generate
from dataset.transforms import create_transform
from tools import write_shards


def decode_only(image):
    """The decoded image, not transformed: a fixed tensor so that batches collate."""
    image.getpixel((0, 0))
    return torch.zeros(1)


def samples_per_second(dataset, batch, workers):
    loader = train_loader(dataset, batch, workers, seed=0)
    if hasattr(dataset, 'set_position'):
        dataset.set_position(0, 0)
    start, count = time.perf_counter(), 0
    for images, _ in loader:
        count += len(images)
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--samples', type=int, default=2000, help='synthetic image-caption pairs')
    parser.add_argument('--image_size', type=int, default=256, help='side of the JPEG files')
    parser.add_argument('--image_res', type=int, default=256, help='the transform output size')
    parser.add_argument('--shard_size', type=int, default=500)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--dir', default=None, help='data folder (default: a temporary one)')
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        data, shard_dir = os.path.join(folder, 'data'), os.path.join(folder, 'shards')
        if not os.path.isfile(os.path.join(shard_dir, 'shards.json')):
            generate(data, seed=0, size='tiny', image_size=args.image_size, pretrain=args.samples)
            write_shards.main(['--train_file', os.path.join(data, 'pretrain.json'), '--image_root', data,
                               '--out', shard_dir, '--shard_size', str(args.shard_size)])
        count = len(os.listdir(shard_dir)) - 1
        pattern = os.path.join(shard_dir, f'{{00000..{count - 1:05d}}}.tar')
        print(f'{args.samples} samples, {args.image_size} px JPEGs, {count} shards; batch {args.batch}, '
              f'{args.workers} workers, {torch.get_num_threads()} threads, best of {args.repeats}')
        for name, transform in (('pretrain transform', create_transform('pretrain', args.image_res)),
                                ('decode only', decode_only)):
            sources = {
                'files': BadSamplePolicy(pretrain_dataset(os.path.join(data, 'pretrain.json'), transform,
                                                          image_root=data), 'skip'),
                'shards': PretrainShards([pattern], transform),
            }
            for dataset in sources.values():  # warm the page cache and the workers' imports
                samples_per_second(dataset, args.batch, args.workers)
            best = {key: 0.0 for key in sources}
            for _ in range(args.repeats):
                for key, dataset in sources.items():
                    best[key] = max(best[key], samples_per_second(dataset, args.batch, args.workers))
            print(f'{name:>18}: files {best["files"]:8.1f} samples/s   shards {best["shards"]:8.1f} '
                  f'samples/s   shards / files {best["shards"] / best["files"]:.2f}x', flush=True)


if __name__ == '__main__':
    main()

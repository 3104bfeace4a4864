"""Write pre-training annotation JSONs and their images as webdataset tar shards, with the
`shards.json` index of sample counts that dataset/shards.py reads the epoch length from.

    python -m tools.write_shards --train_file cc3m.json sbu.json --image_root /data/images \
        --out /data/shards/4m --shard_size 1000 [--resize 384] [--workers 16]
    # then in the config: train_file: ['/data/shards/4m/{00000..03999}.tar']

Index shards written by another tool (img2dataset), so that runs read their counts instead of
walking every tar's headers at start:

    python -m tools.write_shards --index /data/cc3m

A sample is `{key}.{jpg|png|webp}` (the image file's bytes, or with --resize the image resized
by tools/resize_images.py's rule: shorter side --resize, bicubic, never upscaled), `{key}.txt`
(the caption; the first of a list) and `{key}.json` (`{"image": the record's path, "caption":
the record's caption}`): a list caption stays a list there, and training draws one of its
captions at every read, as it does from the JSON. Keys are the record's place in the
concatenated JSONs (`000000042`); shards are `00000.tar`, `00001.tar`, ... in record order, each
written atomically. Every image is decoded once as training reads it (dataset/images.py);
records whose image cannot be read are left out and listed (and in --out/write_shards_failed.txt),
and the exit code is then 1. Formats other than JPEG, PNG and WebP are stored as PNG.
"""
import argparse
import contextlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time

from dataset.images import ImageLoadError
from dataset.pretrain_dataset import _check_caption_record, load_annotations
from dataset.shards import INDEX_FORMAT, INDEX_NAME, count_samples, decode_image, require_webdataset
from tools.resize_images import IMAGE_EXTENSIONS, process

SUFFIXES = {'JPEG': 'jpg', 'PNG': 'png', 'WEBP': 'webp'}  # stored as they are; others as PNG
FAILED_LIST = 'write_shards_failed.txt'
LISTED_FAILURES = 20
MTIME = 0  # fixed member times: the same inputs give byte-identical shards


def image_file(task):
    """(suffix, bytes) of one record's image as stored in the shard, or (None, error message).
    task = (path, --resize or None)."""
    path, size = task
    out_format = IMAGE_EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if out_format is None:
        return None, f'{path}: not an image file name ({", ".join(sorted(IMAGE_EXTENSIONS))})'
    try:
        with tempfile.TemporaryDirectory() if size is not None else contextlib.nullcontext() as folder:
            if size is not None:
                resized = os.path.join(folder, 'image' + os.path.splitext(path)[1])
                _, status, message = process((path, resized, size, path))
                if status == 'failed':
                    return None, f'{path}: {message}'
            with open(resized if size is not None else path, 'rb') as f:
                data = f.read()
        image = decode_image(data, path)  # decoded as training decodes it: a damaged file fails now
    except (ImageLoadError, OSError) as error:
        return None, f'{path}: {error}'
    if out_format not in SUFFIXES:  # BMP, GIF, TIFF: the reader takes JPEG, PNG and WebP
        buffer = io.BytesIO()
        image.save(buffer, format='PNG')
        return 'png', buffer.getvalue()
    return SUFFIXES[out_format], data


def _write_atomically(path, write):
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.part')
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_index(folder, entries, **source):
    """`folder`/shards.json: entries = [(file name, samples)], sizes read from the files."""
    shards = [{'name': name, 'samples': samples, 'bytes': os.path.getsize(os.path.join(folder, name))}
              for name, samples in entries]
    index = {'format': INDEX_FORMAT, 'samples': sum(s['samples'] for s in shards), 'shards': shards,
             **source}
    path = os.path.join(folder, INDEX_NAME)
    _write_atomically(path, lambda f: f.write(json.dumps(index, indent=1).encode('utf-8')))
    return index


def index_folder(folder):
    """Count the samples of every .tar in `folder` and write its shards.json."""
    names = sorted(n for n in os.listdir(folder) if n.endswith('.tar'))
    if not names:
        raise SystemExit(f'error: {folder} holds no .tar shards')
    index = write_index(folder, [(n, count_samples(os.path.join(folder, n))) for n in names])
    print(f'{folder}/{INDEX_NAME}: {index["samples"]} samples in {len(names)} shards')
    return index


def write_shards(records, image_root, out, shard_size, resize=None, workers=1, print_every=10.0):
    """Write `records` (validated pre-training records) as shards in `out`; returns
    (index, [(record place, message)] of the records left out)."""
    wds = require_webdataset('tools.write_shards')
    tasks = [(os.path.join(image_root, r['image']), resize) for r in records]
    pool = multiprocessing.Pool(workers) if workers > 1 and len(tasks) > 1 else None
    images = pool.imap(image_file, tasks, chunksize=16) if pool else map(image_file, tasks)
    entries, failures, batch, start, last_print = [], [], [], time.time(), time.time()

    def flush():
        name = f'{len(entries):05d}.tar'

        def write(f):
            with wds.TarWriter(f, encoder=False, mtime=MTIME) as tar:
                for sample in batch:
                    tar.write(sample)
        _write_atomically(os.path.join(out, name), write)
        entries.append((name, len(batch)))
        batch.clear()

    try:
        for place, (record, (suffix, data)) in enumerate(zip(records, images, strict=True)):
            if suffix is None:
                failures.append((place, data))
            else:
                caption = record['caption']
                first = caption[0] if isinstance(caption, list) else caption
                meta = {'image': record['image'], 'caption': caption}
                batch.append({'__key__': f'{place:09d}', suffix: data, 'txt': first.encode('utf-8'),
                              'json': json.dumps(meta, ensure_ascii=False).encode('utf-8')})
                if len(batch) == shard_size:
                    flush()
            now = time.time()
            if now - last_print >= print_every:
                last_print = now
                print(f'[{place + 1}/{len(records)}] {len(entries)} shards, '
                      f'{(place + 1) / (now - start):.1f} records/s, {len(failures)} left out', flush=True)
        if batch:
            flush()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return write_index(out, entries, resize=resize), failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--train_file', nargs='+', help='pre-training annotation JSONs')
    parser.add_argument('--image_root', default='', help='the folder image paths are relative to')
    parser.add_argument('--out', help='folder for the shards (new or without shards)')
    parser.add_argument('--shard_size', type=int, default=1000, help='samples per shard')
    parser.add_argument('--resize', type=int, default=None,
                        help='shorter side in pixels (tools/resize_images.py rule); default: the '
                             'image files as they are')
    parser.add_argument('--workers', type=int, default=1, help='processes reading the images')
    parser.add_argument('--index', metavar='FOLDER',
                        help='only write FOLDER/shards.json for the shards already there')
    args = parser.parse_args(argv)
    if args.index:
        index_folder(args.index)
        return 0
    if not args.train_file or not args.out:
        parser.error('--train_file and --out are required (or --index FOLDER)')
    if args.shard_size < 1 or args.workers < 1 or (args.resize is not None and args.resize < 1):
        parser.error('--shard_size, --workers and --resize must be positive')
    os.makedirs(args.out, exist_ok=True)
    if any(n.endswith('.tar') for n in os.listdir(args.out)):
        raise SystemExit(f'error: {args.out} already holds shards; choose an empty folder')

    records = load_annotations(args.train_file, _check_caption_record, on_bad_sample='fail')
    start = time.time()
    index, failures = write_shards(records, args.image_root, args.out, args.shard_size,
                                   args.resize, args.workers)
    count = len(index['shards'])
    print(f'{args.out}: {index["samples"]} samples in {count} shards '
          f"(train_file: '{args.out}/{{00000..{count - 1:05d}}}.tar'), {len(failures)} records "
          f'left out ({time.time() - start:.1f} s)', flush=True)
    failed_path = os.path.join(args.out, FAILED_LIST)
    if failures:
        with open(failed_path, 'w', encoding='utf-8') as f:
            f.writelines(f'{place}\t{message}\n' for place, message in failures)
        print(f'{len(failures)} records whose image cannot be read (full list in {failed_path}):')
        for place, message in failures[:LISTED_FAILURES]:
            print(f'  record {place}: {message}')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Pre-resize a dataset's images once, so that training does not decode full-size photos at
every step: the shorter side becomes --size (bicubic, aspect ratio kept, never upscaled).

    python -m tools.resize_images --src /data/coco/images --dst /data/coco/images_512 \
        --size 512 --workers 16

The relative tree and the file names are kept, so the annotation JSONs stay valid with
`image_root` (or `vqa_root`, `vg_root`) pointed at --dst. Images are read as the datasets read
them (dataset/images.py: RGB, truncated files refused and listed, EXIF orientation not
applied) and written as RGB: JPEG at quality 95 for .jpg/.jpeg names, the format of the
extension otherwise. An image whose shorter side is already <= --size and that is stored as RGB
in the format of its extension is copied byte for byte (its pixels unchanged). Outputs are
written atomically, and a file already in --dst is not redone: a killed run continues where it
stopped. Files that cannot be read are listed at the end (and in --dst/.resize_images_failed.txt)
without stopping the run; the exit code is then 1. Files whose extension is not an image's are
left out.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time

from PIL import Image

from dataset.images import load_image

IMAGE_EXTENSIONS = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.jpe': 'JPEG', '.png': 'PNG',
                    '.bmp': 'BMP', '.gif': 'GIF', '.tif': 'TIFF', '.tiff': 'TIFF',
                    '.webp': 'WEBP'}
SAVE_OPTIONS = {'JPEG': {'quality': 95}, 'WEBP': {'quality': 95}}
EXIF_FORMATS = ('JPEG', 'PNG', 'WEBP')  # formats whose writer keeps an EXIF orientation tag
ORIENTATION = 0x0112
MARKER = '.resize_images.json'  # in --dst: the --size it was made with
FAILED_LIST = '.resize_images_failed.txt'
LISTED_FAILURES = 100  # printed at the end; the file has them all


def target_size(width, height, size):
    """(width, height) with the shorter side `size` and the aspect ratio kept; unchanged when the
    shorter side is already <= size."""
    short = min(width, height)
    if short <= size:
        return width, height
    scale = size / short
    if width <= height:
        return size, max(1, round(height * scale))
    return max(1, round(width * scale)), size


def _write_atomically(dst, write):
    """`write(tmp_path)` then rename onto `dst`: a killed run never leaves a partial `dst`."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = os.path.join(os.path.dirname(dst), f'.{os.path.basename(dst)}.part')
    try:
        write(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def process(task):
    """Resize (or copy) one image. task = (src path, dst path, size, relative path).
    Returns (relative path, 'resized' | 'copied' | 'converted' | 'failed', message)."""
    src, dst, size, rel = task
    out_format = IMAGE_EXTENSIONS[os.path.splitext(src)[1].lower()]
    try:
        with Image.open(src) as header:  # format, mode and tags without decoding the pixels
            in_format, in_mode = header.format, header.mode
            orientation = header.getexif().get(ORIENTATION)
        image = load_image(src)  # full decode: a corrupt file fails here, not in training
        width, height = image.size
        new_size = target_size(width, height, size)
        if new_size == (width, height) and in_mode == 'RGB' and in_format == out_format:
            _write_atomically(dst, lambda tmp: shutil.copyfile(src, tmp))
            return rel, 'copied', ''
        status = 'converted'
        if new_size != (width, height):
            image = image.resize(new_size, Image.BICUBIC)
            status = 'resized'
        options = dict(SAVE_OPTIONS.get(out_format, {}))
        if orientation not in (None, 1) and out_format in EXIF_FORMATS:
            # The pixels stay in stored orientation (as the datasets read them); the tag is kept
            # so that a viewer, or load_image(exif_transpose=True), still rotates them the same.
            exif = Image.Exif()
            exif[ORIENTATION] = orientation
            options['exif'] = exif
        _write_atomically(dst, lambda tmp: image.save(tmp, format=out_format, **options))
        return rel, status, ''
    except Exception as error:  # noqa: BLE001 - one bad file must not stop the run
        return rel, 'failed', f'{type(error).__name__}: {error}'


def find_images(src):
    """(relative paths of the images under `src`, sorted; number of other files)."""
    images, others = [], 0
    for folder, subfolders, files in os.walk(src):
        subfolders.sort()
        for name in sorted(files):
            if name.endswith('.part') and name.startswith('.'):
                continue
            rel = os.path.relpath(os.path.join(folder, name), src)
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(rel)
            else:
                others += 1
    return images, others


def _check_folders(src, dst, size):
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
    if not os.path.isdir(src):
        raise SystemExit(f'error: --src {src} is not a folder')
    if dst_real == src_real or dst_real.startswith(src_real + os.sep):
        raise SystemExit(f'error: --dst {dst} must not be --src or inside it')
    os.makedirs(dst, exist_ok=True)
    marker = os.path.join(dst, MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            made_with = json.load(f).get('size')
        if made_with != size:
            raise SystemExit(f'error: {dst} holds images resized with --size {made_with}; '
                             f'use another --dst for --size {size}')
    else:
        with open(marker, 'w') as f:
            json.dump({'size': size}, f)


def _duration(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--src', required=True, help='folder of the original images')
    parser.add_argument('--dst', required=True, help='folder for the resized copies (same tree)')
    parser.add_argument('--size', required=True, type=int,
                        help='shorter side in pixels after resizing (smaller images are kept)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                        help='processes (default: one per CPU)')
    parser.add_argument('--print_every', type=float, default=10.0,
                        help='seconds between progress lines')
    args = parser.parse_args(argv)
    if args.size < 1 or args.workers < 1:
        parser.error('--size and --workers must be positive')
    _check_folders(args.src, args.dst, args.size)

    images, others = find_images(args.src)
    tasks = [(os.path.join(args.src, rel), os.path.join(args.dst, rel), args.size, rel)
             for rel in images]
    todo = [task for task in tasks if not os.path.exists(task[1])]
    counts = {'skipped': len(tasks) - len(todo), 'resized': 0, 'copied': 0, 'converted': 0,
              'failed': 0}
    print(f'{len(images)} images under {args.src} ({counts["skipped"]} already in {args.dst}, '
          f'{len(todo)} to do; {others} other files left out), {args.workers} workers', flush=True)

    failures = []
    start = last_print = time.time()
    if args.workers == 1 or len(todo) < 2:
        results = map(process, todo)
        pool = None
    else:
        pool = multiprocessing.Pool(args.workers)
        results = pool.imap_unordered(process, todo, chunksize=8)
    try:
        for done, (rel, status, message) in enumerate(results, 1):
            counts[status] += 1
            if status == 'failed':
                failures.append((rel, message))
            now = time.time()
            if now - last_print >= args.print_every or done == len(todo):
                last_print = now
                rate = done / max(now - start, 1e-9)
                print(f'[{done}/{len(todo)}] {100 * done / len(todo):.1f}%  {rate:.1f} images/s  '
                      f'ETA {_duration((len(todo) - done) / rate)}  failed {counts["failed"]}',
                      flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    print('done: ' + ', '.join(f'{n} {name}' for name, n in counts.items()) +
          f' ({_duration(time.time() - start)})', flush=True)
    failed_path = os.path.join(args.dst, FAILED_LIST)
    if failures:
        failures.sort()
        with open(failed_path, 'w') as f:
            f.writelines(f'{rel}\t{message}\n' for rel, message in failures)
        print(f'{len(failures)} unreadable images (not written; full list in {failed_path}):')
        for rel, message in failures[:LISTED_FAILURES]:
            print(f'  {rel}: {message}')
        if len(failures) > LISTED_FAILURES:
            print(f'  ... (+{len(failures) - LISTED_FAILURES})')
        return 1
    if os.path.exists(failed_path):
        os.remove(failed_path)
    return 0


if __name__ == '__main__':
    sys.exit(main())

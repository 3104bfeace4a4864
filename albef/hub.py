"""The released files by name, and the download cache behind `--checkpoint NAME`.

    from albef.hub import list_pretrained, resolve_checkpoint
    path = resolve_checkpoint('albef_mscoco')     # or 'mscoco.pth', a URL, or a local path

A name or an http(s) URL is downloaded once into the cache (`cache_dir`, else $ALBEF_CACHE, else
$XDG_CACHE_HOME/albef, i.e. ~/.cache/albef): into a `.part` file that a later attempt continues
(HTTP Range), then moved into place. The file's sha256 is written beside it (`<file>.sha256`) on
that first download and checked on every later use, so a file changed in the cache is an error,
never silently different weights. $ALBEF_MIRROR replaces the download location of the released
files (an http(s) base URL or a folder holding them under their release names), for clusters
without internet. Offline ($ALBEF_OFFLINE=1 or $HF_HUB_OFFLINE=1) nothing is downloaded: a file
missing from the cache is an error saying where to put it. In a distributed run rank 0 downloads
while the others wait, then all read the same cached file.
"""
import difflib
import hashlib
import http.client
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from models.checkpoint import CheckpointError
from models.pretrained import DEIT_BASE_URL, rank_zero_first

logger = logging.getLogger(__name__)

CACHE_ENV = 'ALBEF_CACHE'
MIRROR_ENV = 'ALBEF_MIRROR'
OFFLINE_ENVS = ('ALBEF_OFFLINE', 'HF_HUB_OFFLINE')
RELEASE_BASE_URL = 'https://storage.googleapis.com/sfr-pcl-data-research/ALBEF/'

# A dropped connection is retried this many times in one call, each attempt continuing the
# partial file; the partial file also survives the call, for the next one to continue.
ATTEMPTS = 3
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class DownloadError(CheckpointError):
    """A checkpoint that cannot be found, downloaded or trusted (a one-line error in the scripts)."""


@dataclass(frozen=True)
class Pretrained:
    name: str           # the registry name (the file name is accepted too)
    file: str           # the released file name
    kind: str           # the model kind of its weights (models.checkpoint.checkpoint_kind)
    script: str         # the task script it is used with
    config: str         # the config of this repository it pairs with
    image_res: int      # the resolution its position embeddings were trained at
    description: str
    url: str = ''       # '' = the release location + file (RELEASE_BASE_URL, or ALBEF_MIRROR)
    sha256_prefix: str = ''  # where the publisher states one (the DeiT file name carries it)

    @property
    def download_url(self):
        return self.url or RELEASE_BASE_URL + self.file


# The original release (the links of its README, NeurIPS version: all seven are there; not
# downloaded while this was written, so no sha256 is known in advance) and the two unimodal
# initialisations.
# NOTE(faithful): refcoco.pth holds retrieval-model weights; Grounding.py uses that model.
REGISTRY = (
    Pretrained('albef_14m', 'ALBEF.pth', 'pretrain', 'Pretrain.py', 'configs/Pretrain.yaml', 256,
               'pre-trained on 14M images; the starting point of every fine-tuning config'),
    Pretrained('albef_4m', 'ALBEF_4M.pth', 'pretrain', 'Pretrain.py', 'configs/Pretrain.yaml',
               256, "pre-trained on 4M images (the paper's 4M rows)"),
    Pretrained('albef_mscoco', 'mscoco.pth', 'retrieval', 'Retrieval.py',
               'configs/Retrieval_coco.yaml', 384,
               'fine-tuned for COCO retrieval (also zero-shot Flickr30K: '
               'configs/Retrieval_flickr_zeroshot.yaml)'),
    Pretrained('albef_flickr30k', 'flickr30k.pth', 'retrieval', 'Retrieval.py',
               'configs/Retrieval_flickr.yaml', 384, 'fine-tuned for Flickr30K retrieval'),
    Pretrained('albef_vqa', 'vqa.pth', 'vqa', 'VQA.py', 'configs/VQA.yaml', 384,
               'fine-tuned for VQA v2'),
    Pretrained('albef_refcoco', 'refcoco.pth', 'retrieval', 'Grounding.py',
               'configs/Grounding.yaml', 384,
               'fine-tuned for weakly-supervised grounding on RefCOCO+ (retrieval-model weights)'),
    Pretrained('albef_nlvr_pretrain', 'pretrain_model_nlvr.pth', 'pretrain_nlvr', 'NLVR.py',
               'configs/NLVR.yaml', 256,
               'after the NLVR2 text-assignment step (configs/NLVR_pretrain.yaml): the '
               '--checkpoint of NLVR2 fine-tuning'),
    Pretrained('deit_base_patch16_224', os.path.basename(DEIT_BASE_URL), 'deit', 'Pretrain.py',
               'configs/Pretrain.yaml', 224,
               'DeiT-B/16 ImageNet weights: the image encoder initialisation (init_deit: true)',
               url=DEIT_BASE_URL, sha256_prefix='b5f2ef4d'),
    Pretrained('bert-base-uncased', 'bert-base-uncased', 'bert', 'Pretrain.py',
               'configs/Pretrain.yaml', 0,
               'the text encoder initialisation and tokenizer (text_encoder: a Hugging Face '
               'name, resolved by transformers, not by this cache)',
               url='https://huggingface.co/bert-base-uncased'),
)
_BY_NAME = {key.lower(): entry for entry in REGISTRY for key in (entry.name, entry.file)}


def list_pretrained(file=None):
    """The registry's entries; printed as a table when `file` is given (e.g. sys.stdout)."""
    if file is not None:
        rows = [('name', 'file', 'kind', 'config', 'image_res', 'url')] + [
            (e.name, e.file, e.kind, e.config, str(e.image_res or '-'), _url_of(e))
            for e in REGISTRY]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            print('  '.join(c.ljust(w) for c, w in zip(row, widths)) + '  ' + row[-1], file=file)
    return list(REGISTRY)


def lookup(name):
    """The registry entry named `name` (registry name or release file name, any case), or None."""
    return _BY_NAME.get(str(name).lower())


def cache_dir_default():
    """$ALBEF_CACHE, else $XDG_CACHE_HOME/albef, else ~/.cache/albef."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'albef')


def _true(value):
    return value.strip().lower() in ('1', 'true', 'yes', 'on')


def is_offline():
    return any(_true(os.environ.get(env, '')) for env in OFFLINE_ENVS)


def _is_url(text):
    return str(text).startswith(('http://', 'https://'))


def _url_of(entry):
    mirror = os.environ.get(MIRROR_ENV, '')
    if mirror and entry.kind != 'bert':
        return mirror.rstrip('/') + '/' + entry.file if _is_url(mirror) else \
            os.path.join(mirror, entry.file)
    return entry.download_url


def _cache_path(name_or_url, cache_dir):
    """Where a registry entry or URL lives in the cache: released files under their own name
    (a mirror and the original share it); other URLs in a folder named by the URL's hash, so
    that two URLs ending in the same file name never share a cache entry."""
    entry = lookup(name_or_url)
    if entry is not None:
        return os.path.join(cache_dir, entry.file)
    url_hash = hashlib.sha256(name_or_url.encode()).hexdigest()[:16]
    name = os.path.basename(urllib.parse.urlparse(name_or_url).path) or 'download'
    return os.path.join(cache_dir, 'url', url_hash, name)


def _unknown(name):
    name = str(name)
    if os.sep in name or (os.altsep and os.altsep in name):  # meant as a path
        return DownloadError(f'checkpoint {name!r} does not exist (released checkpoints go by '
                             'name: python -m albef.hub lists them)')
    names = [e.name for e in REGISTRY] + [e.file for e in REGISTRY]
    lowered = {n.lower(): n for n in names}
    close = [lowered[n] for n in difflib.get_close_matches(name.lower(), list(lowered), n=3,
                                                          cutoff=0.6)]
    hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
    return DownloadError(
        f'checkpoint {name!r} does not exist and is neither a released checkpoint name nor an '
        f'http(s) URL.{hint} Known names: {", ".join(e.name for e in REGISTRY)} (or their file '
        f'names: {", ".join(e.file for e in REGISTRY)}).')


def resolve_checkpoint(name_or_path, cache_dir=None):
    """A local file path for `name_or_path`: an existing path as is; a registry name or an
    http(s) URL downloaded on first use into the cache (see the module docstring) and checked
    against its recorded sha256 on every use. In a distributed run rank 0 downloads while the
    other ranks wait. Raises DownloadError with what to do when the file cannot be had."""
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        return text
    entry = lookup(text)
    if entry is None and not _is_url(text):
        raise _unknown(text)
    if entry is not None and entry.kind == 'bert':
        raise DownloadError(f'{entry.name!r} is a Hugging Face model name: pass it as '
                            '--text_encoder / text_encoder (transformers resolves it), not as a '
                            'checkpoint file')
    cache_dir = os.path.expanduser(os.fspath(cache_dir)) if cache_dir else cache_dir_default()
    url = _url_of(entry) if entry is not None else text
    expected_prefix = entry.sha256_prefix if entry is not None else ''
    if not _is_url(url):  # a mirror folder on a shared file system: read in place
        if not os.path.isfile(url):
            raise DownloadError(f'{entry.file} is not in the mirror folder ${MIRROR_ENV}='
                                f'{os.environ[MIRROR_ENV]} (expected {url})')
        return url
    path = _cache_path(text, cache_dir)

    def others():  # rank 0 has downloaded and checked it; the other ranks read the same file
        if not os.path.isfile(path):
            raise DownloadError(f'{path} (downloaded by rank 0) is not visible here: the cache '
                                f'folder must be shared by all nodes (--cache_dir or ${CACHE_ENV}), '
                                'or hold the file on every node')
        return path

    return rank_zero_first(lambda: _fetch(url, path, expected_prefix), others, DownloadError)


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def log_resolved(name_or_path, path, config, evaluate=False):
    """Log where a --checkpoint name or URL was found; with --evaluate, warn when the config's
    image_res differs from the released file's (its position embeddings would be interpolated,
    which fine-tuning expects and evaluation usually does not) and name the config it pairs
    with. The config is never swapped: several configs fit some files (zero-shot retrieval)."""
    if os.fspath(name_or_path) == path:
        return
    logger.info('--checkpoint %s: %s', name_or_path, path)
    entry = lookup(name_or_path)
    if evaluate and entry is not None and config.get('image_res') not in (None, entry.image_res):
        logger.warning('%s was trained at image_res %d and pairs with %s; this config has '
                       'image_res %s', entry.file, entry.image_res, entry.config,
                       config.get('image_res'))


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path):
    return path + '.sha256'


def _verify(path):
    """Check a cached file against the sha256 recorded when it was downloaded."""
    sidecar = _sidecar(path)
    if not os.path.isfile(sidecar):
        # A file put into the cache by hand (the offline instructions): trusted as given and
        # recorded now, so that later changes to it are caught.
        _write_sidecar(path, _sha256_file(path))
        logger.info('recorded the sha256 of %s (placed in the cache by hand)', path)
        return path
    with open(sidecar) as f:
        recorded = f.read().split()[0] if os.path.getsize(sidecar) else ''
    actual = _sha256_file(path)
    if actual != recorded:
        raise DownloadError(
            f'cached checkpoint {path} does not match the sha256 recorded when it was downloaded '
            f'({recorded[:16]}... recorded, {actual[:16]}... now): the file changed or is '
            f'damaged. Delete it (and {os.path.basename(sidecar)}) to download it again.')
    return path


def _write_sidecar(path, digest):
    tmp = _sidecar(path) + f'.tmp{os.getpid()}'
    with open(tmp, 'w') as f:  # the format of `sha256sum`, so `sha256sum -c` checks it too
        f.write(f'{digest}  {os.path.basename(path)}\n')
    os.replace(tmp, _sidecar(path))


def _fetch(url, path, expected_prefix=''):
    if os.path.isfile(path):
        return _verify(path)
    if is_offline():
        env = next(e for e in OFFLINE_ENVS if _true(os.environ.get(e, '')))
        raise DownloadError(f'offline (${env}): {os.path.basename(path)} is not in the cache. '
                            f'Download {url} and put it at {path} (or set ${MIRROR_ENV} to a '
                            'folder or server holding the released files)')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path + '.lock'):
        if os.path.isfile(path):  # another process finished it while this one waited
            return _verify(path)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                digest = _download(url, path + '.part')
                break
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                    socket.timeout, TimeoutError, _Incomplete) as e:
                if isinstance(e, urllib.error.HTTPError):
                    raise DownloadError(f'cannot download {url}: HTTP {e.code} {e.reason}') from e
                if attempt == ATTEMPTS:
                    raise DownloadError(
                        f'cannot download {url} ({_reason(e)}). Without network access, download '
                        f'it elsewhere and put it at {path} (or set ${MIRROR_ENV}); a later '
                        f'attempt continues the partial file {path}.part') from e
                logger.warning('download of %s interrupted (%s); continuing (attempt %d of %d)',
                               url, _reason(e), attempt + 1, ATTEMPTS)
                # A refused or timed-out connection gets a moment; a cut one continues at once.
                cut = isinstance(e, (_Incomplete, http.client.IncompleteRead))
                time.sleep(0 if cut else min(2 ** attempt, 10))
        if expected_prefix and not digest.startswith(expected_prefix):
            os.remove(path + '.part')
            raise DownloadError(f'{url} downloaded with sha256 {digest[:16]}..., not the '
                                f'published {expected_prefix}...: removed; try again')
        _write_sidecar(path, digest)
        os.replace(path + '.part', path)
        # Safe to remove while held: whoever waits on it finds the file when it gets the lock,
        # and later processes see the file before they look for a lock.
        _remove(path + '.lock')
    logger.info('downloaded %s to %s (sha256 %s)', url, path, digest)
    return path


class _Incomplete(OSError):
    """The connection ended before the announced size arrived."""


def _reason(error):
    return str(getattr(error, 'reason', None) or error) or type(error).__name__


def _download(url, part):
    """Download `url` into `part`, continuing what `part` holds; the sha256 of the whole file."""
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    headers = {'User-Agent': 'albef-hub'}
    if offset:
        headers['Range'] = f'bytes={offset}-'
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        os.remove(part)  # the partial file is no prefix of what the server has now: start over
        return _download(url, part)
    with response:
        digest = hashlib.sha256()
        resumed_at = response.headers.get('Content-Range', '').partition(' ')[2].split('-')[0]
        if offset and response.status == 206 and resumed_at != str(offset):
            response.close()  # not the continuation asked for: start over
            os.remove(part)
            return _download(url, part)
        if offset and response.status == 206:
            with open(part, 'rb') as f:  # the part already there counts towards the hash
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            mode = 'ab'
        else:  # a server that ignores Range sends the whole file
            offset, mode = 0, 'wb'
        length = response.headers.get('Content-Length')
        total = offset + int(length) if length is not None else None
        received = offset
        with open(part, mode) as f, _progress(os.path.basename(url), total, offset) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and received != total:
        raise _Incomplete(f'connection closed after {received} of {total} bytes')
    return digest.hexdigest()


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


def _progress(name, total, initial):
    """A progress bar with size, speed and ETA on stderr (tqdm comes with huggingface_hub)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit='B', unit_scale=True, unit_divisor=1024,
                desc=f'downloading {name}', file=sys.stderr, mininterval=1.0,
                disable=os.environ.get('ALBEF_PROGRESS', '1') == '0')


class _locked:
    """An exclusive lock on `path` (fcntl.flock) while a file is downloaded, so that two jobs
    sharing a cache never write the same partial file. Where locks are unsupported, no lock."""

    def __init__(self, path):
        self.path, self.file = path, None

    def __enter__(self):
        try:
            import fcntl
            self.file = open(self.path, 'a')
            fcntl.flock(self.file, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self.file:
                self.file.close()
            self.file = None
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()
        return False


def main(argv=None):
    """python -m albef.hub [NAME_OR_URL ...]: list the released files, or download them."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__.split(': ', 1)[1])
    parser.add_argument('names', nargs='*', help='registry names, file names or URLs')
    parser.add_argument('--cache_dir', default=None, help=f'default: ${CACHE_ENV} or ~/.cache/albef')
    args = parser.parse_args(argv)
    if not args.names:
        list_pretrained(file=sys.stdout)
        return 0
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    for name in args.names:
        try:
            print(resolve_checkpoint(name, args.cache_dir))
        except DownloadError as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Released checkpoints by name (albef.hub): downloads from a local HTTP server on 127.0.0.1 that
stands in for the release location through ALBEF_MIRROR (no internet): first download, cache
hits, a dropped connection continued by HTTP Range, a changed cached file refused, the offline
and unknown-name errors, `--checkpoint URL` in Retrieval.py, a two-process torchrun in which
only rank 0 downloads, and DeiT initial weights by timm name from a local Hugging Face cache.

Run as a script under torchrun, this file is the worker of the two-process test.
"""
import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from albef import hub  # noqa: E402
from tests.tiny import python_path  # noqa: E402


class Server:
    """Serves `files` (name -> bytes) with Range support; records (path, Range header) of every
    GET; a name in `drop_once` gets half of its bytes and a closed connection the first time."""

    def __init__(self, files, drop_once=()):
        self.files, self.drop_once, self.requests = dict(files), set(drop_once), []
        self.ranges = True  # False: a server that ignores Range and sends the whole file
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip('/')
                server.requests.append((name, self.headers.get('Range')))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get('Range') and server.ranges:
                    start = int(self.headers['Range'].split('=')[1].split('-')[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                else:
                    self.send_response(200)
                self.send_header('Content-Length', str(len(data) - start))
                self.end_headers()
                if name in server.drop_once:
                    server.drop_once.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, kwargs={'poll_interval': 0.05},
                         daemon=True).start()

    def count(self, name):
        return sum(1 for path, _ in self.requests if path == name)

    def close(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


def tiny_file(size=300_000, seed=0):
    return torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8).numpy().tobytes()


@pytest.fixture
def server(monkeypatch, tmp_path):
    server = Server({'mscoco.pth': tiny_file(), 'vqa.pth': tiny_file(seed=1)})
    monkeypatch.setenv(hub.MIRROR_ENV, server.url)
    for env in (*hub.OFFLINE_ENVS, hub.CACHE_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv('ALBEF_PROGRESS', '0')
    yield server
    server.close()


def test_download_once_then_cache_hits(server, tmp_path):
    cache = tmp_path / 'cache'
    path = hub.resolve_checkpoint('albef_mscoco', cache_dir=cache)
    assert path == str(cache / 'mscoco.pth')
    data = server.files['mscoco.pth']
    assert Path(path).read_bytes() == data
    digest = hashlib.sha256(data).hexdigest()
    assert Path(path + '.sha256').read_text() == f'{digest}  mscoco.pth\n'
    assert not list(cache.glob('*.part')) and not list(cache.glob('*.lock'))
    # the file name names the same entry, in any case; nothing is requested again
    assert hub.resolve_checkpoint('mscoco.pth', cache_dir=cache) == path
    assert hub.resolve_checkpoint('MSCOCO.pth', cache_dir=cache) == path
    assert server.requests == [('mscoco.pth', None)]
    # an existing path is returned as is; ALBEF_CACHE is the default cache
    assert hub.resolve_checkpoint(path) == path
    os.environ[hub.CACHE_ENV] = str(cache)
    try:
        assert hub.resolve_checkpoint('albef_mscoco') == path
    finally:
        del os.environ[hub.CACHE_ENV]
    assert len(server.requests) == 1


def test_url_downloads_into_its_own_cache_folder(server, tmp_path):
    url = f'{server.url}/vqa.pth'
    path = hub.resolve_checkpoint(url, cache_dir=tmp_path)
    assert Path(path).parent.parent == tmp_path / 'url' and Path(path).name == 'vqa.pth'
    assert Path(path).read_bytes() == server.files['vqa.pth']
    assert hub.resolve_checkpoint(url, cache_dir=tmp_path) == path
    assert server.count('vqa.pth') == 1


def test_dropped_connection_continues_with_range(server, tmp_path):
    data = server.files['mscoco.pth']
    server.drop_once.add('mscoco.pth')
    path = hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path)
    assert Path(path).read_bytes() == data
    assert server.requests == [('mscoco.pth', None), ('mscoco.pth', f'bytes={len(data) // 2}-')]
    assert Path(path + '.sha256').read_text().split()[0] == hashlib.sha256(data).hexdigest()


def test_partial_file_is_kept_for_the_next_attempt(server, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, 'ATTEMPTS', 1)
    data = server.files['mscoco.pth']
    server.drop_once.add('mscoco.pth')
    with pytest.raises(hub.DownloadError, match=r'continues the partial file .*mscoco\.pth\.part'):
        hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path)
    assert (tmp_path / 'mscoco.pth.part').stat().st_size == len(data) // 2
    assert not (tmp_path / 'mscoco.pth').exists()
    path = hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path)
    assert Path(path).read_bytes() == data
    assert server.requests[-1] == ('mscoco.pth', f'bytes={len(data) // 2}-')


def test_server_without_range_support_sends_the_whole_file_again(server, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, 'ATTEMPTS', 1)
    server.ranges = False
    server.drop_once.add('mscoco.pth')
    with pytest.raises(hub.DownloadError):
        hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path)
    path = hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path)
    assert Path(path).read_bytes() == server.files['mscoco.pth']
    assert Path(path + '.sha256').read_text().split()[0] == \
        hashlib.sha256(server.files['mscoco.pth']).hexdigest()


def test_changed_cached_file_is_an_error_not_a_silent_reload(server, tmp_path):
    path = Path(hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path))
    damaged = bytearray(path.read_bytes())
    damaged[1000] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(hub.DownloadError, match=r'mscoco\.pth does not match the sha256.*Delete it'):
        hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path)
    assert len(server.requests) == 1
    path.unlink()  # the fix the message names
    assert Path(hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path)).read_bytes() == \
        server.files['mscoco.pth']


@pytest.mark.parametrize('env', hub.OFFLINE_ENVS)
def test_offline_says_which_file_to_put_where(server, tmp_path, monkeypatch, env):
    monkeypatch.setenv(env, '1')
    with pytest.raises(hub.DownloadError) as error:
        hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path)
    message = str(error.value)
    assert f'${env}' in message and f'{server.url}/mscoco.pth' in message
    assert str(tmp_path / 'mscoco.pth') in message
    assert server.requests == []
    # a file put there by hand is used (and its sha256 recorded from then on)
    (tmp_path / 'mscoco.pth').write_bytes(b'weights')
    assert hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path) == str(tmp_path / 'mscoco.pth')
    assert (tmp_path / 'mscoco.pth.sha256').read_text().startswith(hashlib.sha256(b'weights').hexdigest())


def test_unreachable_server_says_which_file_to_put_where(server, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, 'ATTEMPTS', 1)
    port = server.httpd.server_address[1]
    server.close()
    with pytest.raises(hub.DownloadError, match=rf'cannot download http://127.0.0.1:{port}/'
                                                rf'mscoco.pth .*put it at {tmp_path}/mscoco.pth'):
        hub.resolve_checkpoint('albef_mscoco', cache_dir=tmp_path)


def test_http_error_names_the_status(server, tmp_path):
    with pytest.raises(hub.DownloadError, match='HTTP 404'):
        hub.resolve_checkpoint(f'{server.url}/missing.pth', cache_dir=tmp_path)


def test_mirror_folder_is_read_in_place(tmp_path, monkeypatch):
    (tmp_path / 'refcoco.pth').write_bytes(b'x')
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path))
    assert hub.resolve_checkpoint('albef_refcoco', cache_dir=tmp_path / 'c') == str(tmp_path / 'refcoco.pth')
    with pytest.raises(hub.DownloadError, match='not in the mirror folder'):
        hub.resolve_checkpoint('albef_vqa', cache_dir=tmp_path / 'c')


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(hub.DownloadError) as error:
        hub.resolve_checkpoint('albef_mscocoo')
    message = str(error.value)
    assert "Did you mean 'albef_mscoco'" in message
    assert all(entry.name in message for entry in hub.REGISTRY)
    with pytest.raises(hub.DownloadError, match='Hugging Face model name'):
        hub.resolve_checkpoint('bert-base-uncased')
    with pytest.raises(hub.DownloadError, match=r"checkpoint 'out/missing.pth' does not exist"):
        hub.resolve_checkpoint('out/missing.pth')


def test_registry_lists_the_release(capsys):
    entries = hub.list_pretrained(file=sys.stdout)
    files = {e.file for e in entries}
    assert {'ALBEF.pth', 'ALBEF_4M.pth', 'mscoco.pth', 'flickr30k.pth', 'vqa.pth', 'refcoco.pth',
            'pretrain_model_nlvr.pth'} <= files
    for entry in entries:
        if entry.kind != 'bert':
            assert (ROOT / entry.config).is_file(), entry
    assert 'https://storage.googleapis.com/sfr-pcl-data-research/ALBEF/' in \
        hub.lookup('albef_14m').download_url
    assert 'albef_refcoco' in capsys.readouterr().out


def test_evaluating_a_released_file_at_another_resolution_is_pointed_out(caplog):
    caplog.set_level('INFO', logger='albef.hub')
    hub.log_resolved('mscoco.pth', '/cache/mscoco.pth', {'image_res': 256}, evaluate=True)
    assert 'mscoco.pth was trained at image_res 384 and pairs with configs/Retrieval_coco.yaml' \
        in caplog.text
    caplog.clear()
    hub.log_resolved('mscoco.pth', '/cache/mscoco.pth', {'image_res': 384}, evaluate=True)
    hub.log_resolved('albef_14m', '/cache/ALBEF.pth', {'image_res': 384})  # fine-tuning: expected
    assert 'WARNING' not in caplog.text and '--checkpoint albef_14m: /cache/ALBEF.pth' in caplog.text


def test_checkpoint_url_in_a_task_script(server, tmp_path, caplog):
    """Retrieval.py --evaluate (zero-shot, from a pre-training file) with --checkpoint URL gives
    what the same file gives by path."""
    import Retrieval
    from tests.tiny import synthetic_with_pretrained, tiny_config
    data, pretrained = synthetic_with_pretrained(tmp_path / 'data')
    tiny_config('Retrieval.yaml', data, data / 'retrieval.yaml', batch_size_train=8,
                batch_size_test=8, queue_size=16, k_test=4)
    server.files['tiny/pretrained.pth'] = pretrained.read_bytes()

    def evaluate(checkpoint, out):
        return Retrieval.main(['--config', str(data / 'retrieval.yaml'), '--output_dir',
                               str(tmp_path / out), '--device', 'cpu', '--evaluate',
                               '--checkpoint', checkpoint, '--cache_dir', str(tmp_path / 'cache')])

    by_url = evaluate(f'{server.url}/tiny/pretrained.pth', 'by_url')
    assert server.count('tiny/pretrained.pth') == 1
    cached = next((tmp_path / 'cache' / 'url').glob('*/pretrained.pth'))
    assert f'--checkpoint {server.url}/tiny/pretrained.pth: {cached}' in caplog.text
    assert by_url['test'] == evaluate(str(pretrained), 'by_path')['test']


def test_only_rank_zero_downloads(server, tmp_path):
    server.files['tiny.pth'] = tiny_file(seed=2)
    env = {**os.environ, 'PYTHONPATH': python_path(), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           '--master_port', str(29500 + (os.getpid() + 500) % 1000), __file__,
           server.url, str(tmp_path / 'cache')]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = tmp_path / 'cache' / 'url'
    cached = next(path.glob('*/tiny.pth'))
    for rank in (0, 1):
        assert f'rank {rank}: {cached}' in result.stdout
        assert f'rank {rank} refused: ' in result.stdout
    assert "rank 1 refused: rank 0 failed (DownloadError): cannot download" in result.stdout
    assert server.count('tiny.pth') == 1 and server.count('missing.pth') == 1


def test_deit_by_timm_name_from_a_local_hugging_face_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    from models.pretrained import PretrainedWeightsError, load_deit_weights
    from models.vit import VisionTransformer, interpolate_pos_embed

    # timm's own ViT at 224 px, saved where the hub cache keeps timm/deit_base_patch16_224.fb_in1k
    deit = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    revision = 'a' * 40
    repo = tmp_path / 'hf' / 'models--timm--deit_base_patch16_224.fb_in1k'
    (repo / 'snapshots' / revision).mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(revision)
    save_file({k: v.contiguous() for k, v in deit.state_dict().items()},
              repo / 'snapshots' / revision / 'model.safetensors')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')

    ours = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    load_deit_weights(ours, 'deit_base_patch16_224.fb_in1k')
    loaded = ours.state_dict()
    assert torch.equal(loaded['blocks.0.attn.qkv.weight'], deit.state_dict()['blocks.0.attn.qkv.weight'])
    assert torch.equal(loaded['pos_embed'], interpolate_pos_embed(deit.state_dict()['pos_embed'], ours))
    with pytest.raises(PretrainedWeightsError, match=r'local Hugging Face cache'):
        load_deit_weights(ours, 'vit_small_patch16_224.augreg_in21k')
    with pytest.raises(PretrainedWeightsError, match='neither a local file, a URL nor a timm'):
        load_deit_weights(ours, 'no_such_model')


def _worker(url, cache_dir):
    """Each rank resolves the same URL (rank 0 downloads, rank 1 waits), then a missing one
    (rank 0's error reaches rank 1)."""
    import torch.distributed as dist
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    os.environ['ALBEF_PROGRESS'] = '0'
    print(f'rank {rank}: {hub.resolve_checkpoint(f"{url}/tiny.pth", cache_dir)}', flush=True)
    try:
        hub.resolve_checkpoint(f'{url}/missing.pth', cache_dir)
    except Exception as e:
        print(f'rank {rank} refused: {e}', flush=True)
    dist.destroy_process_group()


if __name__ == '__main__':
    _worker(*sys.argv[1:3])


def test_a_released_name_evaluates_with_its_paired_config_when_none_is_given(tmp_path):
    import os

    import Retrieval
    import engine
    import utils
    flickr = engine.paired_config('albef_flickr30k', 'retrieval')
    assert flickr.endswith(os.path.join('configs', 'Retrieval_flickr.yaml')) and os.path.isfile(flickr)
    assert engine.paired_config('refcoco.pth', 'grounding').endswith('Grounding.yaml')
    assert engine.paired_config('albef_refcoco', 'retrieval') is None  # another script's file
    assert engine.paired_config(str(tmp_path / 'mine.pth'), 've') is None
    with pytest.raises(utils.ConfigError, match='--config is required'):
        Retrieval.main(['--output_dir', str(tmp_path / 'out'), '--checkpoint', 'albef_flickr30k'])
    assert not (tmp_path / 'out').exists()

"""benchmarks/gpu_check.py, the one-call GPU measurement, exercised on the CPU: `--smoke` runs
every section with the tiny configs and must leave a JSON record with numbers in each (the
figures themselves mean nothing on a CPU and are not checked)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_check') / 'gpu_check.json'
    result = subprocess.run([sys.executable, '-m', 'benchmarks.gpu_check', '--smoke', '--device',
                             'cpu', '--out', str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout, out


def test_smoke_run_records_every_section_with_numbers(smoke):
    data, stdout, out = smoke
    assert data['meta']['smoke'] is True and positive(data['meta']['seconds'])
    for section in gpu_check.SECTIONS:
        assert data[section]['status'] == 'ok', (section, data[section])
        assert positive(data[section]['seconds']), section
    env = data['environment']
    assert all(positive(env['peak_tflops'][kind]) for kind in ('bf16', 'fp32', 'tf32'))
    assert env['torch'] and 'ruamel.yaml' in env['modules']

    tests = data['tests']  # on a CPU every CUDA test is skipped, cleanly
    assert tests['returncode'] == 0 and tests['counts'].get('skipped', 0) >= 10
    assert not tests['counts'].get('failed') and not tests['counts'].get('error')
    assert tests['outcomes'] and all(o['outcome'] == 'skipped' for o in tests['outcomes'].values())
    assert os.path.isfile(tests['log'])

    pretrain = data['pretrain']
    assert pretrain['flops_per_step']['plain'] > pretrain['flops_per_step']['fast'] > 0
    assert list(pretrain['variants']) == list(gpu_check.VARIANTS)
    for name, variant in pretrain['variants'].items():
        assert variant['status'] == 'ok', (name, variant)
        for key in ('s_per_step', 'images_per_s', 'mfu', 'tflops_per_s', 'speedup_vs_plain_fp32'):
            assert positive(variant[key]), (name, key, variant[key])
    assert pretrain['variants']['fast_bf16_compile']['compiled_layers'] > 0

    for name, variant in data['vqa']['variants'].items():
        assert variant['status'] == 'ok' and positive(variant['s_per_step']), (name, variant)
        assert positive(variant['speedup_vs_plain_fp32'])

    runs = data['retrieval']['runs']
    assert set(runs) == {'fp32', 'bf16'}
    for precision, run in runs.items():
        assert run['status'] == 'ok', (precision, run)
        for key in ('encode_s', 'plain_s', 'fast_s', 'speedup'):
            assert positive(run[key]), (precision, key)
        assert run['pairs']['fast'] <= run['pairs']['plain']
        assert set(run['recalls']) == {'plain', 'fast'} and isinstance(run['recalls_equal'], bool)
    assert runs['fp32']['max_abs_score_diff'] < 1e-4  # the same score matrices
    assert 'max_abs_diff_fast_bf16_vs_plain_fp32' in runs['bf16']

    assert 'targets:' in stdout and 'SMOKE RUN' in stdout  # the table, printed last
    assert stdout.rstrip().splitlines()[-1].startswith('results: ')
    assert json.loads(out.read_text()) == data  # nothing left half-written


def test_defaults_are_the_full_size_run():
    args = gpu_check.parse_args([])
    assert (args.batch, args.steps, args.images, args.captions, args.k_test) == \
        (64, 5, 1000, 5000, 16)
    assert args.pretrain_config == 'configs/Pretrain.yaml' and args.vqa_batch == 32
    assert args.retrieval_config == 'configs/Retrieval_flickr.yaml'
    assert args.sections == list(gpu_check.SECTIONS) and args.variants == list(gpu_check.VARIANTS)
    smoke = gpu_check.parse_args(['--smoke', '--device', 'cpu', '--batch', '8'])
    assert smoke.batch == 8 and smoke.pretrain_config == 'configs/tiny/Pretrain.yaml'
    with pytest.raises(SystemExit):
        gpu_check.parse_args(['--sections', 'environment,nonsense'])


def test_table_of_a_partial_record():
    """A run stopped early leaves some sections out: the table still prints, targets unmeasured."""
    variants = {'plain_fp32': {'status': 'ok', 's_per_step': 1.0},
                'fast_bf16_compile': {'status': 'skipped'}}
    text = gpu_check.table({'meta': {}, 'pretrain': {'variants': variants},
                            'environment': {'name': 'GPU', 'peak_tflops': {'bf16': 700.0}}})
    assert 'plain_fp32' in text and '[skipped]' in text and text.count('not measured') == 3

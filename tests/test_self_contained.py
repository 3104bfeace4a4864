"""The suite reads nothing outside the repository (tests/conftest.py, tests/_guard.py): a
sibling folder of the clone is refused, while the repository, imports, tmp_path and system
files are not."""
import os
from pathlib import Path

import pytest
import torch

from tests import _guard
from tests._guard import ROOT, outside_repository

SIBLING = Path(ROOT).parent / 'sibling' / 'reference'
siblings_refused = pytest.mark.skipif(
    not _guard.SIBLINGS_REFUSED, reason='the repository lies directly in the temporary folder, '
    'whose files cannot be told from siblings of the repository')


@siblings_refused
def test_a_sibling_folder_of_the_repository_is_refused(monkeypatch):
    assert outside_repository(f'{ROOT}/../sibling/reference/x')
    assert outside_repository(SIBLING / 'tiny_a' / 'pretrain' / 'expected.pt')
    assert outside_repository(os.fsencode(SIBLING / 'state_dict_manifests.json'))
    monkeypatch.chdir(ROOT)
    assert outside_repository('../sibling/reference/x')
    assert outside_repository(Path('tests/../../sibling'))


def test_the_repository_and_its_fixtures_are_allowed(monkeypatch):
    fixtures = Path(ROOT) / 'tests' / 'fixtures' / 'original'
    assert not outside_repository(fixtures / 'tiny_a' / 'pretrain' / 'expected.pt')
    assert not outside_repository(os.fsencode(fixtures / 'state_dict_manifests.json'))
    monkeypatch.chdir(Path(ROOT) / 'tests')
    assert not outside_repository('fixtures/original/README.md')
    assert not outside_repository('../configs')
    assert not outside_repository(Path(ROOT).parent)  # listing the folder above is no read


def test_tmp_path_installed_packages_and_system_files_are_allowed(tmp_path):
    assert not outside_repository(tmp_path / 'any' / 'file.pt')
    assert not outside_repository(torch.__file__)
    assert not outside_repository(pytest.__file__)
    assert not outside_repository(os.__file__)
    assert not outside_repository('/proc/self/status')
    assert not outside_repository('/etc/hosts')
    assert not outside_repository(os.path.expanduser('~/.cache/torch/x'))


@siblings_refused
def test_open_and_listdir_outside_the_repository_raise_before_the_os_is_asked():
    missing = Path(ROOT).parent / 'definitely-not-here.txt'
    with pytest.raises(RuntimeError, match='outside the repository'):
        open(missing)  # FileNotFoundError would mean the OS was asked first
    with pytest.raises(RuntimeError, match='outside the repository'):
        open(str(missing).encode(), 'rb')
    with pytest.raises(RuntimeError, match='outside the repository'):
        os.listdir(SIBLING)
    with pytest.raises(RuntimeError, match='outside the repository'):
        list(os.scandir(SIBLING))
    assert (Path(ROOT) / 'tests' / 'fixtures' / 'original' / 'README.md').read_text()


@siblings_refused
def test_an_allowed_folder_beside_the_repository_is_readable(monkeypatch):
    """What ALBEF_REFERENCE_DIR gets: only that folder, not its neighbours."""
    monkeypatch.setattr(_guard, '_allowed', set(_guard._allowed))
    monkeypatch.setattr(_guard, '_decisions', {})
    _guard.allow(SIBLING)
    assert not outside_repository(SIBLING / 'tiny_a' / 've' / 'inputs.pt')
    assert outside_repository(SIBLING.parent / 'other')

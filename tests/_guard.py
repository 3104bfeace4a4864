"""Keeps the test suite self-contained: a test may read the repository, the Python installation,
the temporary folders, the user's caches and the system folders, and nothing else. A fresh
clone has nothing beside it, so a test that reads a sibling folder of the repository (as the
parity tests once read a sibling fixtures folder) passes here and fails for everyone else; the guard
makes it fail here too, with a clear message.

tests/conftest.py installs `audit_hook` (sys.addaudithook) when pytest imports it. It checks the
audit events 'open' (builtins.open, os.open, io.open_code for imports), 'os.listdir' and
'os.scandir', and raises RuntimeError before the operating system is asked, so a missing file
gives the guard's error, not FileNotFoundError. `outside_repository(path)` makes the decision;
results are cached per absolute path.

ALBEF_REFERENCE_DIR (read by tests/reference.py) is allowed: reading there is intended. If the
repository lies directly in the temporary folder (e.g. /tmp/albef), its siblings cannot be told
from temporary files, and the temporary folder stays allowed.
"""
import getpass
import os
import site
import sys
import tempfile

ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
PARENT = os.path.dirname(ROOT)
SYSTEM = ('/dev', '/proc', '/sys', '/etc', '/usr', '/lib', '/lib64', '/bin', '/var', '/run', '/opt')
EVENTS = frozenset({'open', 'os.listdir', 'os.scandir'})
# False when the repository lies directly in the temporary folder (see above)
SIBLINGS_REFUSED = os.path.realpath(tempfile.gettempdir()) != PARENT

_allowed = set()     # allowed folders, each as abspath and realpath
_decisions = {}      # absolute path -> outside_repository(path)
_ancestors = set()   # ROOT's parent folders: listing them is not reading a sibling
_folder = ROOT
while os.path.dirname(_folder) != _folder:
    _folder = os.path.dirname(_folder)
    _ancestors.add(_folder)


def _under(path, prefix):
    return path == prefix or path.startswith(prefix + os.sep)


def allow(path):
    """Let the tests read `path` (a folder or file) and everything under it."""
    if not path:
        return
    path = os.path.expanduser(os.fsdecode(os.fspath(path)))
    for form in (os.path.abspath(path), os.path.realpath(path)):
        if form != os.sep:  # '/' would allow everything
            _allowed.add(form.rstrip(os.sep))
    _decisions.clear()


def _default_places():
    places = [tempfile.gettempdir(), sys.prefix, sys.base_prefix, sys.exec_prefix, *SYSTEM,
              os.environ.get('PYTEST_DEBUG_TEMPROOT'), os.environ.get('ALBEF_REFERENCE_DIR')]
    try:  # pytest's default basetemp: <tmp>/pytest-of-<user>
        places.append(os.path.join(tempfile.gettempdir(), f'pytest-of-{getpass.getuser()}'))
    except (KeyError, OSError, ImportError):
        pass
    places += [p for p in sys.path  # site-packages, the standard library, PYTHONPATH entries
               if p and os.path.exists(p) and not _under(os.path.realpath(p), ROOT)]
    try:
        places.append(site.getusersitepackages())
    except AttributeError:  # a virtual environment's site module may lack it
        pass
    # the user's caches and library settings (matplotlib lists ~/.local/share/fonts, ~/.fonts)
    places += ['~/.cache', '~/.config', '~/.local/share', '~/.fonts', '~/.triton']
    places += [os.environ.get(name) for name in ('XDG_CACHE_HOME', 'XDG_CONFIG_HOME', 'XDG_DATA_HOME',
                                                 'HF_HOME', 'HF_HUB_CACHE', 'TORCH_HOME',
                                                 'TRITON_CACHE_DIR', 'MPLCONFIGDIR')]
    return places


for _place in _default_places():
    allow(_place)


def _decide(path):
    absolute, real = os.path.abspath(path), os.path.realpath(path)
    if _under(real, ROOT) or real in _ancestors:
        return False
    forms = (absolute, real)
    if _under(real, PARENT):
        # A sibling of the repository: allowed only inside an allowed place that lies there
        # itself (pytest's basetemp when the repository is in /tmp, ALBEF_REFERENCE_DIR), not
        # because an allowed place contains the whole parent folder.
        places = [p for p in _allowed if _under(p, PARENT) and p != PARENT]
        if not SIBLINGS_REFUSED:
            places.append(PARENT)
    else:
        places = _allowed
    return not any(_under(form, place) for form in forms for place in places)


def outside_repository(path):
    """True when a test must not read `path` (str, bytes or path-like; a relative path is taken
    from the current folder): it lies outside the repository and outside the allowed places."""
    path = os.fsdecode(os.fspath(path))
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    decision = _decisions.get(path)
    if decision is None:
        decision = _decisions[path] = _decide(path)
    return decision


active = True


def audit_hook(event, args):
    if event not in EVENTS or not active:
        return
    path = args[0] if args else None
    if path is None:  # os.listdir() / os.scandir(): the current folder
        path = '.'
    if isinstance(path, int):  # a file descriptor: already open
        return
    try:
        refused = outside_repository(path)
    except (TypeError, ValueError):  # not a path at all: leave it to the callee
        return
    if refused:
        raise RuntimeError(f'test read {os.fsdecode(os.fspath(path))} outside the repository '
                           f'{ROOT}: a fresh clone has nothing beside it (put fixtures under '
                           f'tests/fixtures/, or point ALBEF_REFERENCE_DIR at them)')

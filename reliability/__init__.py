"""hupt's reliability suite: soak, storms and control-protocol fuzzing (see conftest.py).

integration/ goes on sys.path here, as pytest puts it there for integration's
own tests (that directory has no __init__.py): the suite's modules import its
harness as `harness`, `load` and `supervision`, as integration's tests do.
"""

import sys
from pathlib import Path

_INTEGRATION = str(Path(__file__).resolve().parent.parent / "integration")
if _INTEGRATION not in sys.path:
    sys.path.insert(0, _INTEGRATION)

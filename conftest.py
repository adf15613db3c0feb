"""For every test suite: hupt's loop runs strict, so that a violated invariant
(two starting generations, a busy loop) fails the test instead of being logged.
Set here, at import, so that every hupt the integration tests start inherits it."""

import os

os.environ["HUPT_STRICT"] = "1"

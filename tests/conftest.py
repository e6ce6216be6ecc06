"""The project's own tests: pytester, the bridges the tests define, and Hypothesis settings of their
own (the suite's plugin loads no profile globally, see conformance.plugin): the suite's, derandomized
under CI, no deadline."""

pytest_plugins = ["pytester"]

import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # bridges defined by the tests themselves

from conformance.cpu_patches import one_thread_per_process  # noqa: E402
from conformance.profiles import default_profile  # noqa: E402

settings.load_profile(default_profile())
one_thread_per_process()  # the tests' oracle and transformers models are tiny, as the suite's

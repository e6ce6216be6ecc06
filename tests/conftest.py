pytest_plugins = ["pytester"]

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # bridges defined by the tests themselves

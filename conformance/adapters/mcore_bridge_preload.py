"""Imported by the rank pool's fork server (`McoreBridgeAdapter.worker_imports`): mcore_bridge,
prepared as the adapter prepares it, so that rank processes start with it loaded instead of importing
it at every start and every restart after a failing example (about 5 s of CPU each).

The CPU patches come first, as in a rank process and in the suite's own process, where the adapter
imports mcore_bridge only after them: a module that binds a patched name at import binds the patch.
"""

from conformance.cpu_patches import apply_cpu_patches

from .mcore_bridge import import_mcore_bridge

apply_cpu_patches()
import_mcore_bridge()

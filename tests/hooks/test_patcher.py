"""The patcher's wrappers: installed on what a checkout's module defines, skipped (not a crash) for
a class a patch lists that the module does not define, removed again at unpatch."""
import sys
import types

import pytest

from dire_plugin.hooks.patcher import MethodPatch
from dire_plugin.hooks.runtime import current_runtime
from dire_plugin.hooks.settings import RunConfig

MODULE = "networks_for_patcher_test"


class Net:
    def embed(self, x):
        return x


@pytest.fixture
def networks(tmp_path):
    """A ``networks`` module of a checkout at ``tmp_path`` that defines ConvNet but no AlexNet."""
    module = types.ModuleType(MODULE)
    module.__file__ = str(tmp_path / "networks.py")
    module.ConvNet = type("ConvNet", (Net,), {"embed": lambda self, x: x})
    sys.modules[MODULE] = module
    yield module
    del sys.modules[MODULE]


def test_a_listed_class_the_module_lacks_is_skipped(networks, tmp_path):
    # DM's patch lists every network of DC-BENCH's networks.py; a checkout's networks may have fewer.
    patch = MethodPatch("dm", {}, (), capture="embed",
                        capture_options={"embed": ((MODULE, "ConvNet.embed"), (MODULE, "AlexNet.embed"))})
    original = vars(networks.ConvNet)["embed"]
    patch.patch(RunConfig(method="dm", script="x.py", log_every=0), root=tmp_path, bank_factory=lambda *a: None)
    try:
        assert current_runtime() is not None
        wrapped = vars(networks.ConvNet)["embed"]
        assert wrapped is not original and wrapped.__wrapped__ is original
        assert not hasattr(networks, "AlexNet")
    finally:
        patch.unpatch()
    assert vars(networks.ConvNet)["embed"] is original and current_runtime() is None

"""SIGTERM while DiRe runs: raised as Terminated (so the run unwinds and writes its manifest) only
while it has its default action, and given back when the runtime stops."""
import os
import signal
import time

import pytest

from dire_plugin.hooks.settings import RunConfig
from dire_plugin.hooks.termination import Terminated, install_sigterm, interruption, uninstall_sigterm
from dire_plugin.patches import sre2l


@pytest.fixture
def default_sigterm():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_the_runtime_turns_sigterm_into_terminated_and_gives_it_back(default_sigterm):
    sre2l.patch(RunConfig(method="sre2l", script="fixture.py", log_every=0), bank_factory=lambda *a: None)
    try:
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler's exception ends the sleep (it has run already, on Linux)
    finally:
        sre2l.unpatch()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_handler_of_the_script_or_its_parent_stays(default_sigterm):
    def own(signum, frame):
        pass

    signal.signal(signal.SIGTERM, own)
    assert install_sigterm() is False and signal.getsignal(signal.SIGTERM) is own
    uninstall_sigterm()
    assert signal.getsignal(signal.SIGTERM) is own
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    assert install_sigterm() is False and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_exit_codes_are_the_shells():
    assert interruption(Terminated()) == ("terminated by SIGTERM", 143)
    assert interruption(KeyboardInterrupt()) == ("interrupted", 130)
    assert interruption(RuntimeError("x")) is None
    assert str(Terminated()) == "SIGTERM"

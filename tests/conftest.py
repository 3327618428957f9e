"""Suite-wide setup."""

from __future__ import annotations

import signal

# A runner that starts the suite as a background job of a non-interactive shell (`cmd &`) hands it SIGINT ignored,
# and every process it spawns would inherit that: `mai chat` and `mai demo` would then never see the Ctrl-C the
# tests press, as a user's terminal delivers it. Restore the terminal's SIGINT (children get the default action).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

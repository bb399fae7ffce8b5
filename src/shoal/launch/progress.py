"""The launcher's live view: a tqdm bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Progress"]

_PLAIN_EVERY_SECONDS = 5.0


class Progress:
    def __init__(self, total_steps: int, *, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.total = total_steps
        self.interactive = not quiet and self.stream.isatty()
        self._bar = (tqdm(total=total_steps, unit="step", file=self.stream, dynamic_ncols=True)
                     if self.interactive else None)
        self._last_plain = 0.0
        self._last_step = 0

    def update(self, *, step: int, loss: float | None, samples_per_second: float,
               alive: int, generation: int) -> None:
        fields = {"loss": f"{loss:.4f}" if loss is not None else "-",
                  "samples/s": f"{samples_per_second:.0f}", "workers": alive, "gen": generation}
        if self._bar is not None:
            self._bar.update(step - self._last_step)
            self._bar.set_postfix(fields, refresh=False)
        elif not self.quiet and time.monotonic() - self._last_plain >= _PLAIN_EVERY_SECONDS:
            self._last_plain = time.monotonic()
            details = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"shoal: step {step}/{self.total} {details}", file=self.stream, flush=True)
        self._last_step = step

    def message(self, text: str, *, always: bool = False) -> None:
        """A line that must not tear the bar (worker output, membership changes)."""
        if self.quiet and not always:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

"""Stop strings over streamed text: emit what can no longer become a stop string, hold the rest.

mlx-lm's server matches stop *token sequences*; OpenAI's ``stop`` is text, which a model
can produce through many different tokenizations, so it is matched on the decoded text.
"""

from __future__ import annotations


class StopStringFilter:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Add newly decoded text; return the part that is safe to send to the client."""
        if self.stopped:
            return ""
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        cut = min(found)[0] if found else -1
        if cut >= 0:
            self.stopped = True
            self.matched = min(found)[1]
            self._held = ""
            return buf[:cut]
        hold = self._longest_partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation, whatever was held back is plain text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_suffix(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string. Candidates start
        # where the stop's first character occurs in the tail, so a step costs a few C-level
        # comparisons, not one per suffix length (16 long stop strings stay cheap).
        best = 0
        for stop in self.stops:
            i = buf.find(stop[0], max(0, len(buf) - len(stop) + 1))
            while i != -1 and len(buf) - i > best:
                if stop.startswith(buf[i:]):
                    best = len(buf) - i
                    break
                i = buf.find(stop[0], i + 1)
        return best

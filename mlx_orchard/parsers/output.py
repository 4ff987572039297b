"""Split a choice's streamed text into answer text, reasoning and tool calls, as it streams.

Text that might be the start of a marker is held back until the next delta says whether it
is one, so no markup ever reaches the text deltas. Reasoning streams as it comes. A tool call
the model chose to make is read when its region closes (or the answer ends) and handed over
whole — one that does not parse goes back as the text it was, markers included. A call the
grammar forced cannot be malformed, so it streams: its name as soon as it is written, then
its arguments as they come (``stream_calls``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from mlx_orchard.parsers.tool_formats import ToolCall, ToolFormat, checked_call

# Reasoning markers a model may use, by parser name (the text between them is reasoning).
REASONING_FORMATS: dict[str, tuple[str, str]] = {
    "think": ("<think>", "</think>"),  # DeepSeek-R1, Qwen3, QwQ, SmolLM3, ...
    "seed_think": ("<seed:think>", "</seed:think>"),
}


@dataclass
class Piece:
    """``tool_call``: a whole call; ``call_begin`` (id and name), ``call_args`` (a fragment in
    ``text``) and ``call_end`` (the whole call): one streamed call. ``index``: the call's
    place among the answer's calls."""

    kind: Literal["text", "reasoning", "tool_call", "call_begin", "call_args", "call_end"]
    text: str = ""
    call: ToolCall | None = None
    index: int = 0


class _StreamParser:
    """Feeds text through ``_step`` until it has nothing more to do; ``finish`` then runs the
    steps once more as final and hands what remains to ``_rest``."""

    _buf: str

    def _step(self, out: list[Piece], final: bool) -> bool:
        raise NotImplementedError

    def _rest(self, out: list[Piece]) -> None:
        raise NotImplementedError

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while self._step(out, final=False):
            pass
        return _merge(out)

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        while self._step(out, final=True):
            pass
        self._rest(out)
        return _merge(out)


class OutputParser(_StreamParser):
    """One choice's parser. ``functions``: the request's tools by name (None: no tool parsing)."""

    def __init__(self, tools: ToolFormat | None = None, functions: dict[str, dict] | None = None,
                 reasoning: tuple[str, str] | None = None, in_reasoning: bool = False, stream_calls: bool = False):
        self._tools = tools if functions else None
        self._stream_calls = stream_calls and self._tools is not None and self._tools.streamed is not None
        self._call: ToolCall | None = None  # the streamed call being written
        self._functions = functions or {}
        self._reasoning = reasoning
        self._region: Literal["reasoning", "tool"] | None = "reasoning" if reasoning and in_reasoning else None
        self._buf = ""
        self._started = False  # any answer text (not whitespace) emitted yet
        self._space = ""  # whitespace held until real text follows (none around tool calls)
        self._after_region = False  # reasoning or a call came first: the answer's leading whitespace goes
        self.calls = 0

    def _rest(self, out: list[Piece]) -> None:
        if self._region == "tool" and self._call is not None:
            assert self._tools is not None  # cut short (max_tokens) unless its format has no end marker
            self._end_streamed(self._buf, out, complete=self._tools.end is None)
        elif self._region == "tool":
            self._close_tool(self._buf, out, closed=False)
        elif self._region == "reasoning":
            out.append(Piece("reasoning", self._buf))
        elif self._buf.strip() or not (self.calls or self._after_region):
            self._text(self._buf, out)
            if not self.calls and not self._after_region:
                out.append(Piece("text", self._space))
        self._buf, self._region = "", None

    # ---- the state machine: True while there is more to do in the buffer ----

    def _starts(self) -> list[tuple[str, Literal["reasoning", "tool"]]]:
        starts: list[tuple[str, Literal["reasoning", "tool"]]] = []
        if self._reasoning:
            starts.append((self._reasoning[0], "reasoning"))
        if self._tools and not (self._tools.at_start_only and (self._started or self.calls)):
            starts += [(m, "tool") for m in (self._tools.start, *self._tools.also_starts)]
        return starts

    def _step(self, out: list[Piece], final: bool) -> bool:
        buf = self._buf
        if self._region is None:
            starts = self._starts()
            found = [(buf.find(m), m, kind) for m, kind in starts if m in buf]
            if self._tools and self._tools.at_start_only:
                # Only an answer that opens with the marker (after whitespace) is a call.
                found = [f for f in found if f[2] != "tool" or not buf[: f[0]].strip()]
            if found:
                at, marker, kind = min(found, key=lambda f: f[0])
                self._text(buf[:at], out)
                keep = kind == "tool" and self._tools is not None and self._tools.keep_start
                self._buf = buf[at:] if keep else buf[at + len(marker):]
                self._region = kind
                return True
            if final:
                return False
            hold = _held_back(buf, [m for m, _ in starts])
            if self._tools and self._tools.at_start_only and not self._started and not self.calls:
                head = buf.strip()
                if any(m.startswith(head[: len(m)]) for m in (self._tools.start, *self._tools.also_starts)):
                    hold = len(buf)  # whitespace so far, or the opening itself: wait for more
            self._text(buf[: len(buf) - hold], out)
            self._buf = buf[len(buf) - hold:]
            return False
        if self._region == "reasoning":
            assert self._reasoning is not None
            end = self._reasoning[1]
            at = buf.find(end)
            if at >= 0:
                out.append(Piece("reasoning", buf[:at]))
                self._buf, self._region = buf[at + len(end):], None
                self._after_region = True
                return True
            hold = 0 if final else _held_back(buf, [end])
            out.append(Piece("reasoning", buf[: len(buf) - hold]))
            self._buf = buf[len(buf) - hold:]
            return False
        # inside a tool call
        assert self._tools is not None
        if self._stream_calls:
            return self._stream_tool(out, final)
        end_marker = self._tools.end
        if end_marker is None:
            return False  # the call runs to the end of the answer
        at = buf.find(end_marker)
        if at < 0:
            return False
        self._close_tool(buf[:at], out, closed=True)
        self._buf, self._region = buf[at + len(end_marker):], None
        return True

    def _stream_tool(self, out: list[Piece], final: bool) -> bool:
        """A forced call: its name once written, then its arguments as they come."""
        fmt, buf = self._tools, self._buf
        assert fmt is not None and fmt.streamed is not None
        if self._call is None:
            match = fmt.streamed.match(buf)
            if match is None:
                return False  # the name is not complete yet (finish() reads what there is)
            self._call = ToolCall(name=match.group(1), arguments="")
            out.append(Piece("call_begin", call=self._call, index=self.calls))
            self._buf = buf[match.end():]
            return True
        at = buf.find(fmt.end) if fmt.end else -1
        if at >= 0:
            self._end_streamed(buf[:at], out, complete=True)
            self._buf, self._region = buf[at + len(fmt.end or ""):], None
            return True
        hold = min(len(buf), fmt.streamed_suffix + (_held_back(buf, [fmt.end]) if fmt.end else 0))
        self._args(buf[: len(buf) - hold], out)
        self._buf = buf[len(buf) - hold:]
        return False

    def _args(self, fragment: str, out: list[Piece]) -> None:
        if fragment and self._call is not None:
            self._call.arguments += fragment
            out.append(Piece("call_args", text=fragment, index=self.calls))

    def _end_streamed(self, body: str, out: list[Piece], complete: bool) -> None:
        """The rest of a streamed call's arguments (without the layout's closing characters
        when the call is complete; a call cut short keeps all it has)."""
        assert self._tools is not None and self._call is not None
        self._args(body[: max(0, len(body) - self._tools.streamed_suffix)] if complete else body, out)
        out.append(Piece("call_end", call=self._call, index=self.calls))
        self._call = None
        self.calls += 1
        self._after_region = True
        self._space = ""

    def _text(self, text: str, out: list[Piece]) -> None:
        # Trailing whitespace is held until real text follows: before a tool call it is
        # dropped, so every split of the same output gives the same text. After reasoning or
        # a call, the answer's leading whitespace goes too (templates put newlines there).
        if not text.strip():
            self._space += text
            return
        text = self._space + text
        if self._after_region and not self._started:
            text = text.lstrip()
        body = text.rstrip()
        out.append(Piece("text", body))
        self._space = text[len(body):]
        self._started = True

    def _close_tool(self, body: str, out: list[Piece], closed: bool) -> None:
        assert self._tools is not None
        try:
            calls = self._tools.parse(body, self._functions)
        except (ValueError, TypeError, KeyError, RecursionError):
            start = "" if self._tools.keep_start else self._tools.start
            raw = start + body + (self._tools.end or "" if closed else "")
            self._started = True
            out.append(Piece("text", self._space + raw))
            self._space = ""
            return
        self._space = ""
        self._after_region = True
        for call in calls:
            out.append(Piece("tool_call", call=call, index=self.calls))
            self.calls += 1


class HarmonyParser(_StreamParser):
    """OpenAI's harmony format (gpt-oss), read from text that keeps the special tokens:
    ``analysis`` messages are reasoning, ``final`` (and plain ``commentary``) text, and a
    message addressed ``to=functions.NAME`` a tool call."""

    _header = re.compile(r"to=([^\s<]+)")
    _channel = re.compile(r"<\|channel\|>\s*(\w+)")
    _ends = ("<|end|>", "<|call|>", "<|return|>")

    def __init__(self, functions: dict[str, dict] | None = None, stream_calls: bool = False):
        self._functions = functions or {}
        self._stream_calls = stream_calls
        self._call: ToolCall | None = None  # the streamed call being written
        self._buf = ""
        self._header_text: str | None = None  # the current message's header; None: reading a header
        self.calls = 0

    def _rest(self, out: list[Piece]) -> None:
        if self._header_text is not None:
            self._close(self._buf, out)
        self._buf, self._header_text = "", None

    def _kind(self) -> tuple[str, str | None]:
        header = self._header_text or ""
        channel = self._channel.search(header)
        to = self._header.search(header)
        recipient = to.group(1) if to else None
        return (channel.group(1) if channel else "final"), recipient

    def _step(self, out: list[Piece], final: bool) -> bool:
        buf = self._buf
        if self._header_text is None:
            at = buf.find("<|message|>")
            if at < 0:
                return False
            self._header_text, self._buf = buf[:at], buf[at + len("<|message|>"):]
            return True
        found = [(buf.find(e), e) for e in self._ends if e in buf]
        if found:
            at, end = min(found)
            self._close(buf[:at], out)
            self._buf, self._header_text = buf[at + len(end):], None
            return True
        channel, recipient = self._kind()
        if final:
            return False
        if recipient is not None and self._stream_calls and self._call is None:
            self._call = ToolCall(name=recipient.removeprefix("functions."), arguments="")
            out.append(Piece("call_begin", call=self._call, index=self.calls))
        if recipient is None or self._call is not None:  # stream text, reasoning, forced arguments
            hold = _held_back(buf, list(self._ends))
            self._emit(channel, buf[: len(buf) - hold], out)
            self._buf = buf[len(buf) - hold:]
        return False

    def _emit(self, channel: str, text: str, out: list[Piece]) -> None:
        if not text:
            return
        if self._call is not None:
            self._call.arguments += text
            out.append(Piece("call_args", text=text, index=self.calls))
        else:
            out.append(Piece("reasoning" if channel == "analysis" else "text", text))

    def _close(self, body: str, out: list[Piece]) -> None:
        channel, recipient = self._kind()
        if self._call is not None:
            self._emit(channel, body, out)
            out.append(Piece("call_end", call=self._call, index=self.calls))
            self._call = None
            self.calls += 1
            return
        if recipient is None:
            self._emit(channel, body, out)
            return
        name = recipient.removeprefix("functions.")
        try:
            out.append(Piece("tool_call", call=checked_call(name, json.loads(body), self._functions), index=self.calls))
            self.calls += 1
        except (ValueError, TypeError):
            out.append(Piece("text", body))


def _held_back(text: str, markers: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of the same text kind as one."""
    out: list[Piece] = []
    for p in pieces:
        if p.kind in ("text", "reasoning") and not p.text:
            continue
        if out and p.kind in ("text", "reasoning", "call_args") and out[-1].kind == p.kind and out[-1].index == p.index:
            out[-1] = Piece(p.kind, out[-1].text + p.text, index=p.index)
        else:
            out.append(p)
    return out

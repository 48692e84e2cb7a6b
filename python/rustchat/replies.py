"""A generated reply's tokens -> what people and the API see: text decoded as it streams,
calculator calls and their results, and stop strings cut out of the text.

`CompletionParser` turns a row's tokens back into conversation parts (text, python,
python_output) for display and chat history; `ReplyEvents` turns them into display events
("text", s) and ("tool", "[calculator: e -> r]"); `StopText` cuts streamed text at the first
stop string a request named.
"""

from __future__ import annotations

import codecs

from .tokenizer import SPECIAL_TOKENS


class CompletionParser:
    """A row's tokens -> events ("text", s), ("python", expr), ("python_output", result).

    Text is decoded incrementally (a multi-byte character split across tokens is held back
    until complete). A tool call gives ("python", expr) at `<|python_end|>` and
    ("python_output", result) at `<|output_end|>`. `finished` turns true at a stop token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        sp = tokenizer.special_tokens
        self.ids = {name: sp[name] for name in SPECIAL_TOKENS if name in sp}
        self.special = set(self.ids.values())
        self.stops = {self.ids.get("<|assistant_end|>"), self.ids.get("<|bos|>")} - {None}
        self.mode = "text"  # or "python" / "output"
        self.buf: list[int] = []
        self.text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finished = False
        self.parts: list[dict] = []

    def _add_part(self, kind: str, text: str) -> None:
        if kind == "text" and self.parts and self.parts[-1]["type"] == "text":
            self.parts[-1]["text"] += text
        elif text or kind != "text":
            self.parts.append({"type": kind, "text": text})

    def feed(self, token: int) -> list[tuple[str, str]]:
        if self.finished:
            return []
        ids, events = self.ids, []
        if token in self.stops:
            self.finished = True
            return self.flush()
        if token in self.special:
            if token == ids.get("<|python_start|>") or token == ids.get("<|output_start|>"):
                events += self.flush()  # (flush keeps its text part itself)
                self.mode = "python" if token == ids["<|python_start|>"] else "output"
                self.buf = []
            elif token == ids.get("<|python_end|>") and self.mode == "python":
                events.append(("python", self.tok.decode(self.buf)))
                self._add_part(*events[-1])
                self.mode = "text"
            elif token == ids.get("<|output_end|>") and self.mode == "output":
                events.append(("python_output", self.tok.decode(self.buf)))
                self._add_part(*events[-1])
                self.mode = "text"
            return events  # other specials (a stray <|user_start|>...) are dropped
        if self.mode == "text":
            s = self.text.decode(self.tok.decode_bytes([token]))
            if s:
                self._add_part("text", s)
                return [("text", s)]
            return []
        self.buf.append(token)
        return []

    def feed_all(self, tokens) -> None:
        """Feed a whole reply for its `parts` (no events): a run of text tokens is decoded in one
        call, which gives the same text as feeding them one by one (the decoder is incremental)
        at a fraction of the cost. Scoring decodes every reply of an evaluation so."""
        run: list[int] = []
        for token in tokens:
            if self.finished:
                break
            if self.mode == "text" and token not in self.special:
                run.append(token)
                continue
            if run:
                self._text_run(run)
                run = []
            self.feed(token)
        if run and not self.finished:
            self._text_run(run)

    def _text_run(self, tokens: list[int]) -> None:
        s = self.text.decode(self.tok.decode_bytes(tokens))
        if s:
            self._add_part("text", s)

    def flush(self) -> list[tuple[str, str]]:
        """Pending text (an incomplete character becomes U+FFFD)."""
        s = self.text.decode(b"", final=True)
        self.text.reset()
        if s:
            self._add_part("text", s)
            return [("text", s)]
        return []

    def content(self):
        """The assistant message content: a string, or a list of parts when tools were used."""
        if all(p["type"] == "text" for p in self.parts):
            return "".join(p["text"] for p in self.parts)
        return [dict(p) for p in self.parts]


def format_tool_call(expr: str, result: str | None) -> str:
    """How chat shows a calculator call: [calculator: 3*7 -> 21]."""
    return f"[calculator: {expr.strip()} -> {result if result is not None else 'refused'}]"


class ReplyEvents:
    """One reply's tokens -> display events ("text", s) and ("tool", "[calculator: e -> r]").

    A tool call whose expression the calculator refused shows when the next token arrives
    without an output. `parser` holds the reply's parts (for history)."""

    def __init__(self, tokenizer, parser: CompletionParser | None = None):
        self.parser = parser or CompletionParser(tokenizer)
        self.pending: str | None = None  # expression waiting for its output

    @property
    def finished(self) -> bool:
        return self.parser.finished

    def feed(self, token: int) -> list[tuple[str, str]]:
        out = []
        for kind, s in self.parser.feed(token):
            if kind == "python":
                if self.pending is not None:
                    out.append(("tool", format_tool_call(self.pending, None)))
                self.pending = s
            elif kind == "python_output":
                out.append(("tool", format_tool_call(self.pending or "", s)))
                self.pending = None
            else:
                if self.pending is not None:
                    out.append(("tool", format_tool_call(self.pending, None)))
                    self.pending = None
                out.append((kind, s))
        return out

    def finish(self, cut: bool = False) -> list[tuple[str, str]]:
        """What is still held back once the reply has ended: by a stop token, or `cut` by its
        token limit (then a call still waiting for its output was never run, not refused)."""
        out = self.parser.flush()
        if self.pending is not None:
            result = "not run: the reply reached its token limit" if cut else None
            out.append(("tool", format_tool_call(self.pending, result)))
            self.pending = None
        return out


class StopText:
    """Cuts streamed text at the first stop string; text that may be the start of one is held
    back until it is known not to be."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf = stops, ""

    def feed(self, s: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached)."""
        self.buf += s
        hits = [i for i in (self.buf.find(x) for x in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        keep = max(
            (n for x in self.stops for n in range(min(len(x) - 1, len(self.buf)), 0, -1) if self.buf.endswith(x[:n])),
            default=0,
        )
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out

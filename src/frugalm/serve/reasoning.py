"""Split R1-style output "<think>reasoning</think>answer" into `reasoning_content` and `content`.

It works on a stream of text deltas, holding back only what could still be the start of a tag, so a
streamed response and a non-streamed one split the same text identically. R1's chat template often
pre-fills "<think>" in the prompt (users then never see the opening tag: DeepSeek-R1#352, vllm#13125);
pass `in_reasoning=True` when the prompt ends with it and the output is read as reasoning until
"</think>".
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"
        self.buf = ""
        self.had_reasoning = in_reasoning  # whether the output has a reasoning part at all

    def feed(self, text: str) -> tuple[str, str]:
        """Add a text delta; return the (reasoning, content) deltas that are now certain."""
        self.buf += text
        reasoning, content = [], []
        while True:
            if self.state == "start":
                stripped = self.buf.lstrip()
                if stripped.startswith(OPEN):
                    self.buf = stripped[len(OPEN):]
                    self.state = "reasoning"
                    self.had_reasoning = True
                    continue
                if OPEN.startswith(stripped):  # still possibly an opening tag (or only whitespace so far)
                    break
                self.state = "content"
                continue
            if self.state == "reasoning":
                i = self.buf.find(CLOSE)
                if i >= 0:
                    reasoning.append(self.buf[:i])
                    self.buf = self.buf[i + len(CLOSE):]
                    self.state = "content"
                    continue
                keep = _partial_suffix(self.buf, CLOSE)
                reasoning.append(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            content.append(self.buf)
            self.buf = ""
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """End of output: whatever was held back is final."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """Whole-output form: (reasoning or None when there was none, content)."""
    p = ReasoningParser(in_reasoning)
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    return (r1 + r2 if p.had_reasoning else None), c1 + c2

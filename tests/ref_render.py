"""Plain-Python reference for conversation rendering and training rows, written from docs/design.md
("Conversation rendering") on tiktoken, one conversation at a time. Tests compare the Rust
core against it; scripts/bench_render.py times it."""

import tiktoken

CHAT_SPECIALS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]


def make_encoding(tok) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="ref_render", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(), special_tokens=tok.special_tokens
    )


class RefRenderer:
    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self.sp = {name: enc.encode_single_token(name) for name in CHAT_SPECIALS}

    def render(self, conversation, max_tokens=2048):
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        messages = list(messages)
        if messages and messages[0]["role"] == "system":
            assert len(messages) > 1 and messages[1]["role"] == "user"
            merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            messages = [merged] + messages[2:]
        assert messages
        sp, enc = self.sp, self.enc
        ids, mask = [], []

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        add([sp["<|bos|>"]], 0)
        for i, msg in enumerate(messages):
            assert msg["role"] == ("user" if i % 2 == 0 else "assistant")
            content = msg["content"]
            if msg["role"] == "user":
                assert isinstance(content, str)
                add([sp["<|user_start|>"]], 0)
                add(enc.encode_ordinary(content), 0)
                add([sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            if isinstance(content, str):
                add(enc.encode_ordinary(content), 1)
            else:
                for part in content:
                    text = enc.encode_ordinary(part["text"])
                    if part["type"] == "text":
                        add(text, 1)
                    elif part["type"] == "python":
                        add([sp["<|python_start|>"]], 1)
                        add(text, 1)
                        add([sp["<|python_end|>"]], 1)
                    elif part["type"] == "python_output":
                        add([sp["<|output_start|>"]], 0)
                        add(text, 0)
                        add([sp["<|output_end|>"]], 0)
                    else:
                        raise ValueError(part["type"])
            add([sp["<|assistant_end|>"]], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation):
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        assert messages[-1]["role"] == "assistant"
        ids, _ = self.render(list(messages)[:-1], max_tokens=None)
        return ids + [self.sp["<|assistant_start|>"]]


def ref_collate(rows, pad_id, max_len=None):
    """SFT batch as lists: inputs [B][L] and targets [B][L]."""
    rows = [(list(ids)[:max_len], list(mask)[:max_len]) if max_len else (list(ids), list(mask)) for ids, mask in rows]
    ncols = max(len(ids) for ids, _ in rows) - 1
    ncols = max(ncols, 0)
    inputs, targets = [], []
    for ids, mask in rows:
        n = len(ids) - 1 if ids else 0
        inp = ids[:-1] + [pad_id] * (ncols - n)
        tgt = [t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (ncols - n)
        inputs.append(inp)
        targets.append(tgt)
    return inputs, targets


def ref_midtrain(renderer, conversations, batch_size, seq_len, n_batches, max_tokens=2048):
    """The first `n_batches` mid-train batches: all conversations rendered and concatenated
    (cycling), cut into consecutive rows of seq_len+1 tokens."""
    need = n_batches * batch_size * (seq_len + 1)
    stream, i = [], 0
    while len(stream) < need:
        stream.extend(renderer.render(conversations[i % len(conversations)], max_tokens)[0])
        i += 1
    out = []
    per = batch_size * (seq_len + 1)
    for b in range(n_batches):
        chunk = stream[b * per : (b + 1) * per]
        rows = [chunk[r * (seq_len + 1) : (r + 1) * (seq_len + 1)] for r in range(batch_size)]
        out.append(([r[:-1] for r in rows], [r[1:] for r in rows]))
    return out

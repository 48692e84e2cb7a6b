"""A stand-in for GPT whose logits follow a script, shared by the engine and eval tests."""

import torch

from rustchat.model import GPTConfig


class ScriptedModel(torch.nn.Module):
    """Stands in for GPT: the logits make script[k] the top token at generated step k
    (positions counted from the KV cache, so it works with and without one)."""

    def __init__(self, vocab_size, prompt_len, script, end_token, seq_len=256):
        super().__init__()
        self.config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.lm_head = torch.nn.Linear(8, vocab_size, bias=False)
        self.prompt_len, self.script, self.end = prompt_len, list(script), end_token

    def get_device(self):
        return self.lm_head.weight.device

    def forward(self, idx, targets=None, *, kv_cache=None, **kw):
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        logits = torch.zeros(B, T, self.config.vocab_size)
        for t in range(T):
            k = start + t + 1 - self.prompt_len
            logits[:, t, self.script[k] if 0 <= k < len(self.script) else self.end] = 10.0
        if kv_cache is not None:
            kv_cache.advance(T)
        return logits

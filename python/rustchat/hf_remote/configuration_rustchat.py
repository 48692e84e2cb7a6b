"""transformers configuration of a rustchat GPT exported with `rustchat export` (remote code:
loaded with `trust_remote_code=True`; it needs only torch and transformers, not rustchat).

The fields are rustchat's GPTConfig fields (docs/design.md, "Model"), so a directory's
config.json reads back into rustchat unchanged."""

from transformers import PretrainedConfig


class RustchatConfig(PretrainedConfig):
    model_type = "rustchat"

    def __init__(
        self,
        sequence_len=2048,
        vocab_size=65536,
        n_layer=20,
        n_head=10,
        n_kv_head=10,
        n_embd=1280,
        window_pattern=None,
        rope_base=10000,
        qk_scale=1.0,
        value_embeds=False,
        layer_lambdas=False,
        smear=False,
        backout=False,
        rope_bf16=False,
        softcap=15.0,
        use_cache=True,
        **kwargs,
    ):
        self.sequence_len, self.vocab_size = sequence_len, vocab_size
        self.n_layer, self.n_head, self.n_kv_head, self.n_embd = n_layer, n_head, n_kv_head, n_embd
        self.window_pattern, self.rope_base, self.qk_scale = window_pattern, rope_base, qk_scale
        self.value_embeds, self.layer_lambdas, self.smear, self.backout = value_embeds, layer_lambdas, smear, backout
        self.rope_bf16, self.softcap, self.use_cache = rope_bf16, softcap, use_cache
        # what generic transformers code looks up
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = n_embd, n_layer, n_head
        self.num_key_value_heads, self.max_position_embeddings = n_kv_head, sequence_len
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

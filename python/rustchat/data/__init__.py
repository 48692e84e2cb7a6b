"""Training data: where each stage's batches come from, and how a run resumes exactly.

Every loader follows one cursor protocol:
- `state()` returns a JSON-able dict: where the NEXT batch starts;
- the loader built with `state=` that dict continues exactly from there.
Checkpoints store one such dict per rank (`meta["data_states"]`).

- `pretrain.PretrainLoader`: documents from parquet/text files, tokenized in a thread (base);
- `midtrain.MidTrainStream`: rendered conversations back to back, every token trained (mid);
- `steps.SFTSteps`: a fixed number of conversations per optimizer step, masked (SFT);
- `steps.StreamSteps`: groups a stream's batches into optimizer steps (base, mid).

Submodules are imported where they are used (the package itself pulls in nothing), so the
tokenizer command reads text through `textsource` without torch.
"""

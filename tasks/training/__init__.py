"""Training library for the `train` stage: SFT on TRL's SFTTrainer (+ accelerate), with
per-micro-batch packing into capped rows (position ids restart per example, attention kept inside each example)
and a loss that computes logits only at answer positions (`sft`)."""

"""The sieve's machinery: plan (validated before any forward), state (per thread), images (placement and content
keys), layout (compaction and masks), stages (one apply path), calls (what each hook does), outputs (realigned
hidden states and attentions), hooks (install / remove)."""

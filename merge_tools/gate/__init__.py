"""Compare the vocabularies of two or more tokenizers before a linear model merge.

Model merging adds embedding matrices row by row, so every model in a merge must map
every token to the same id. This script diffs tokenizers (local directories,
tokenizer.json files or Hugging Face repo ids) against a reference and exits non-zero
on any token->id mismatch, so it can gate a merge in CI or a shell script.

With --mergekit-config and tokenizer_source (union, base, a model), mergekit maps rows by
token: differing vocabularies are reported (the vocabulary audit), not a mismatch.

Exit codes:
  0  vocabularies identical (same size, every token the same id): safe to merge linearly
  1  mismatch: a token->id or size difference (also at equal sizes); with --strict also
     special tokens/flags, chat template, merges/normalizer/pre-tokenizer/decoder or
     encoding fingerprint; with weights (the default) also ghost tokens, differing row
     counts and, with --mergekit-config, an architecture mergekit cannot merge
  2  usage error or unreadable input (one "error: ..." line on stderr)
  130  interrupted (143 SIGTERM, 129 SIGHUP)

Modules (merge_tools/gate, over merge_tools/common), in the order the data goes:
  fingerprint             the ids a tokenizer gives a fixed sample text
  reading                 sources, tokenizer.json, configs, safetensors headers (local or Hub)
  vocab_check             token -> id differences, tokens shared exactly and by bytes
  tokenizer_checks        special tokens and flags, the chat template, the encoding
  weights_check           rows, padding, ghost tokens; the architecture of a merge
  comparison              every check of OTHER against REF
  tokenizer_merge_audit   tokenizer_source merges: the vocabulary audit, what still fails
  audit, audit_reading,   --audit / --plot: every model's task vector, streamed from its
  audit_report            weights, summarized, shown
  report                  the JSON document and the human text
  cli                     build_parser, run, main
"""

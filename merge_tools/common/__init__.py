"""What both tools use, once: errors and signals, logging, sources and the Hub, strict
readers of JSON, tokenizer files and safetensors headers, the vocabulary tensors, token
spellings, mergekit configurations, the merge check, mergekit's tokenizer merge, and the
command-line scaffolding. Nothing here imports from merge_tools.gate or merge_tools.remap."""

"""Permute a causal LM's vocabulary rows into a base tokenizer's token order.

Linear merges (mergekit linear, task arithmetic, TIES, ...) add embedding and lm_head
matrices row by row, so every model must map each token to the same id. This script
rewrites a model (M) so that its rows follow another tokenizer (T):

  append mode (default)  every token of T at T's id, then M's tokens that T lacks, with a
                         patched tokenizer that can decode them
  --drop-extra           exactly T's vocabulary and config.vocab_size: ready to merge

Rows of T's tokens that M lacks are initialised (default: auto, which measures its choice:
a donor's own rows within a family; across families FVT, the mean of the rows of the
source tokens that spell the same text, blended with OMP as a calibration decides). The remap streams tensor by tensor: memory
stays around one vocabulary matrix whatever the model size, and every other tensor is
copied byte for byte.

Exit codes: 0 ok, 1 the self-check of the written output failed, 2 usage or input error,
128 + signal when stopped (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).

Modules (merge_tools/remap, over merge_tools/common), in the order the data goes:
  tokenizers_in, matching  read both tokenizers, pair their tokens
  progress                 progress bars on stderr
  plan                     where every output row comes from (pure)
  row_math, omp            copies, means, FVT and OMP rows
  checkpoints              headers, vocabulary tensors, rows
  options                  the options of a remap and of an alignment
  donor, mergekit_rows     rows of another model (--init donor / omp), of a tokenizer merge
  shards, shard_writer,    the shard plan, the streaming writer, writing and checking
  shard_streaming          every shard
  calibration_text,        --init auto: the built-in text, the choice (pure), running M's
  calibration,             body one layer at a time, the measurement
  body_forward,
  calibration_run
  config_outputs,          config.json / generation_config.json, the tokenizer files
  tokenizer_outputs
  output_dir               lock, staging, atomic publish, leftovers of dead runs
  summary, remap           one remap: read -> plan -> report -> write, and what it says
  model_views, union,      --mergekit-config: the models, the merged tokenizer of a
  alignment_dir, alignment tokenizer_source merge, the folder, the alignment
  cli                      build_parser, options_from_args, run, main
"""

import os

# numpy is imported by the modules of this package, after this line: OpenBLAS spins its
# threads for ~0.1 s of CPU once started, nothing here multiplies matrices with it, and the
# writer threads want every core. (In remap_tokenizer.py it also comes after the signal
# handlers: a Ctrl-C during that 0.1 s import is one line, not a traceback.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

"""Runs a PyTorch peer program under CPU autocast to bfloat16.

  /path/to/torch-venv/bin/python bench/torch_autocast.py PEER.py [ARGS...]

The peer's matrix products (linear layers, attention) then take bfloat16
operands and return bfloat16, torch's mixed precision on a CPU, which
oneDNN runs on AMX or AVX512-BF16 where the CPU has them.
`seq2seq_throughput.py --peer_autocast` uses it to time the peer beside
`transformer_bfloat16`, whose dense products round their operands the same
way but return float32, and whose attention stays float32.
Runs in torch's virtual environment, never imported by attnjax.
"""

import runpy
import sys

import torch


def main() -> None:
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  peer = sys.argv.pop(1)
  sys.argv[0] = peer
  with torch.autocast('cpu', dtype=torch.bfloat16):
    runpy.run_path(peer, run_name='__main__')


if __name__ == '__main__':
  main()

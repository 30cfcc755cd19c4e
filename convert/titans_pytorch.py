"""Convert a titans-pytorch NeuralMemory checkpoint into an MLX model directory (mlx_titans.interop's command line).

    python convert/titans_pytorch.py --checkpoint mem.pt --out mem-mlx \\
        --kwargs '{"dim": 512, "heads": 4, "dim_head": 128, "chunk_size": 64}'
"""

import sys

from mlx_titans.interop import main

if __name__ == "__main__":
    sys.exit(main())

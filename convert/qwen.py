"""Convert a Hugging Face Qwen checkpoint (qwen2, qwen3, their MoEs, the hybrids) into a TitansQwen MLX directory
(mlx_titans.qwen.convert's command line).

    python convert/qwen.py --hf-path Qwen/Qwen2.5-0.5B-Instruct --mlx-path qwen-titans -q
"""

import sys

from mlx_titans.qwen.convert import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""DreamBooth for Stable Diffusion XL with MoSLoRA adapters.

    accelerate launch train_dreambooth.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \\
      --with_prior_preservation --class_prompt "a photo of dog" --rank 4 --mixer learned --output_dir ./out

`python train_dreambooth.py --help` lists every option; the run is dreambooth_moslora/training/loop.py.
"""

import sys

from dreambooth_moslora.training import main

if __name__ == "__main__":
    sys.exit(main())

"""What lmlab writes for other tools, each format tested by loading it in that tool.

peft.py    LoRA adapters as PEFT adapter folders (adapter_config.json +
           adapter_model.safetensors), and back
"""

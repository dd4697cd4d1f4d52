"""The tiny test model: a byte-level BPE tokenizer trained on stdlib sources + a 2-layer Llama (no downloads)."""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer trained on stdlib sources + a 2-layer Llama with random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py')))[:60]
    tokenizer.train(sources, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token='<|im_end|>', pad_token='<|endoftext|>',
                                   bos_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    config = LlamaConfig(vocab_size=fast.vocab_size if hasattr(fast, 'vocab_size') else len(fast),
                         hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    model = with_random_weights(LlamaForCausalLM, config, seed)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def with_random_weights(model_class, config, seed: int):
    """``model_class(config)`` with N(0, 0.08) matrices (seeded): outputs far from uniform, so greedy tokens vary."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.08)
    return model


LORA_SHAPES = {
    'a': {'r': 8, 'lora_alpha': 16, 'target_modules': ['q_proj', 'v_proj']},
    'b': {'r': 16, 'lora_alpha': 8, 'target_modules': ['q_proj', 'o_proj', 'gate_proj']},
}


def build_tiny_lora(model_dir: Path, directory: Path, shape: str, seed: int) -> Path:
    """A PEFT LoRA adapter on the tiny model with random (non-zero) A and B, saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(**LORA_SHAPES[shape], init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if 'lora_' in name:
                parameter.normal_(0.0, 0.15)
    model.save_pretrained(directory)
    return directory


TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for tool in tools %}\n{{ tool.function.name }}: "
    "{{ tool.function.parameters | tojson }}{% endfor %}\nCall one as <tool_call>\n"
    "{\"name\": <name>, \"arguments\": <object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- for call in message.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A Qwen2.5-shaped chat template with tools: offered in a system turn, calls as ``<tool_call>`` JSON, results in
``<tool_response>`` user turns."""


def build_tool_model(model_dir: Path, directory: Path, lessons: list[tuple[dict, str]], max_steps: int = 600) -> Path:
    """The tiny model with :data:`TOOLS_CHAT_TEMPLATE`, trained until its greedy reply to each lesson's trajectory
    (rendered by that template, as the sampler renders it) is the lesson's text then end-of-turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twinkle_async.template import Template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TOOLS_CHAT_TEMPLATE
    template = Template(tokenizer)
    examples = [(list(template.encode(trajectory)['input_ids']),
                 tokenizer(text, add_special_tokens=False)['input_ids'] + [tokenizer.eos_token_id])
                for trajectory, text in lessons]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(max_steps):
        model.train()
        for prompt, reply in examples:
            ids = torch.tensor([prompt + reply])
            labels = torch.tensor([[-100] * len(prompt) + reply])
            model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 19 and all(_greedy(model, prompt, len(reply)) == reply for prompt, reply in examples):
            break
    else:
        raise RuntimeError(f'the tool model did not learn its lessons in {max_steps} steps')
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    import torch
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def build_family_model(tokenizer_dir: Path, directory: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A random 2-layer model of ``model_type`` ('llama', 'mistral', 'qwen2', 'qwen3') with the tiny tokenizer;
    ``overrides`` go to its config (``tie_word_embeddings``, ``rope_parameters``, ``attention_bias``, ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                  tie_word_embeddings=False)
    config = AutoConfig.for_model(model_type, **{**fields, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.08) if parameter.dim() > 1 else parameter.uniform_(0.5, 1.5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory

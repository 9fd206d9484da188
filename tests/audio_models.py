"""Small random audio models shared by the codec, pipeline, chat and serving tests."""

import torch

from anygpt_engine import SoundStorm, SoundStormConfig, codecs
from anygpt_engine.models.speechtokenizer import SpeechTokenizerConfig


def small_speech_models(codebook_size: int = 1024, depth: int = 1, seed: int = 0):
    """(SoundStorm, SpeechTokenizer): narrow random models with AnyGPT's 8 levels; 1024 codes
    per level takes the values an LLM samples inside <sosp>."""
    storm = SoundStorm(SoundStormConfig(dim=32, depth=depth, heads=2, dim_head=16, conv_kernel_size=5,
                                        codebook_size=codebook_size)).eval()
    storm.init_random(seed)
    tokenizer = codecs.SpeechTokenizer(SpeechTokenizerConfig(n_filters=4, dimension=32, codebook_size=codebook_size),
                                       None, device="cpu", seed=seed + 1)
    return storm, tokenizer


def save_tiny_encodec_32khz(root):
    """A tiny EnCodec with encodec_32khz's layout (ratios, 4 x 2048 codebooks, no conv shortcut),
    saved by transformers into `root`; returns root."""
    import transformers

    torch.manual_seed(0)
    config = transformers.EncodecConfig(sampling_rate=32000, upsampling_ratios=[8, 5, 4, 4], codebook_size=2048,
                                        target_bandwidths=[2.2], use_causal_conv=False, use_conv_shortcut=False,
                                        num_filters=4, hidden_size=16, codebook_dim=16, num_lstm_layers=1)
    model = transformers.EncodecModel(config).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:  # zeros until trained
            layer.codebook.embed.normal_(0.0, 0.3)
    model.save_pretrained(root)
    return root

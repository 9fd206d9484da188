"""anygpt-engine: an inference engine for AnyGPT-style any-to-any models."""

from anygpt_engine.chat import Chat, ChatTemplate
from anygpt_engine.config import ModelConfig
from anygpt_engine.engine import Engine
from anygpt_engine.models.soundstorm import SoundStorm, SoundStormConfig
from anygpt_engine.sampling import SamplingParams
from anygpt_engine.tokenizer import Tokenizer
from anygpt_engine.vocab import Vocabulary

__version__ = "0.1.0"
__all__ = ["Chat", "ChatTemplate", "Engine", "ModelConfig", "SamplingParams", "SoundStorm", "SoundStormConfig", "Tokenizer",
           "Vocabulary", "__version__"]

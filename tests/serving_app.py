"""Servers for the serving tests, started as subprocesses on 127.0.0.1.

`python tests/serving_app.py --port P --tokenizer DIR` serves the tiny preset with a tokenizer and
small random speech codecs (`tiny_speech`, which the tests also build in-process for their
references); `anygpt-engine serve` itself has no flags for codecs of made-up sizes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_speech(vocab=None):
    """A SpeechIO over a small random SoundStorm and SpeechTokenizer (1024 codes, the speech
    vocabulary's size) with voices "low" and "high", the same every time."""
    import torch

    from anygpt_engine.pipelines import SpeechPipeline
    from anygpt_engine.serving.speech import SpeechIO
    from audio_models import small_speech_models

    storm, tokenizer = small_speech_models(seed=3)
    pipeline = SpeechPipeline(storm, tokenizer, vocab=vocab)
    t = torch.arange(16000) / 16000  # two named voices: 1 s of a low and of a high hum
    voices = {name: pipeline.voice_prompt((0.3 * torch.sin(2 * torch.pi * hz * t)).unsqueeze(0), 16000)
              for name, hz in (("low", 110), ("high", 440))}
    return SpeechIO(tokenizer, pipeline, vocab=vocab, voices=voices)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess: started, waited for (GET /health, bounded), stopped by its pid."""

    def __init__(self, args: list[str], port: int, log: Path, timeout: float = 90.0):
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": "1"}  # one intra-op thread: the busy 2-core CI machine runs it fastest
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen([sys.executable, *args], env=env, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log_file.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokenizer", required=True)
    args = parser.parse_args()

    from anygpt_engine.serving.async_engine import AsyncEngine
    from anygpt_engine.serving.server import OpenAIServer, run

    engine = AsyncEngine.from_model("tiny", device="cpu", tokenizer=args.tokenizer, num_blocks=400, max_batch_size=8)
    server = OpenAIServer(engine, model_name="tiny-chat", speech=tiny_speech(engine.vocab))
    run(server, port=args.port)


if __name__ == "__main__":
    main()

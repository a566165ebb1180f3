"""Talk to a running text generation server (Megatron-LM's interactive client).

    python tools/text_generation_cli.py --server localhost:5000

Reads a prompt and a number of tokens per turn from standard input (Ctrl-D ends) and prints the
server's text: the prompt and its continuation (PUT /api).
"""

import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from megatron_slm.cli import arg
from megatron_slm.entry import entry_point
from megatron_slm.errors import ConfigError

PROG = "text_generation_cli"


@dataclass
class ClientConfig:
    server: str = arg(None, "HOST:PORT of tools/run_text_generation_server.py.", required=True)

    def __post_init__(self):
        if not self.server or "/" in self.server.removeprefix("http://"):
            raise ConfigError(f"--server must be HOST:PORT, got {self.server!r}")


def ask(url: str, prompt: str, tokens: int) -> str:
    body = json.dumps({"prompts": [prompt], "tokens_to_generate": tokens}).encode()
    request = urllib.request.Request(
        url, data=body, method="PUT", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request) as response:
            return json.load(response)["text"][0]
    except urllib.error.HTTPError as e:
        return f"Error {e.code}: {json.load(e).get('message')}"


@entry_point(PROG, doc=__doc__, groups={"client": ClientConfig})
def main(cfg: ClientConfig) -> int:
    url = f"http://{cfg.server.removeprefix('http://')}/api"
    while True:
        try:
            prompt = input("Enter prompt: ")
            tokens = input("Enter number of tokens to generate: ")
        except EOFError:
            return 0
        if not tokens.strip().isdigit():
            print("Error: the number of tokens must be an integer >= 0")
            continue
        print("Megatron Response: ")
        print(ask(url, prompt, int(tokens)), flush=True)


if __name__ == "__main__":
    sys.exit(main())

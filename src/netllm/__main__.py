"""``python -m netllm`` (and ``accelerate launch -m netllm adapt ...``): the CLI."""

from netllm.cli import main

if __name__ == "__main__":
    main()

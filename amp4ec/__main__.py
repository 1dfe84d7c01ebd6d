"""``python -m amp4ec`` is the ``amp4ec`` command."""

from amp4ec.cli import main

if __name__ == "__main__":
    main()

"""``python -m amp4ec.node_agent``: run a node agent until SIGTERM/SIGINT."""

from amp4ec.node_agent.cli import main

if __name__ == "__main__":
    main()

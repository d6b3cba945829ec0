"""`python -m bench ...` is the same as the `bench` command."""
from .cli import main

if __name__ == "__main__":
    main()

import sys

try:
    from lmlab.cli import main
except KeyboardInterrupt:  # Ctrl-C while starting up: no traceback
    sys.exit(130)

if __name__ == "__main__":
    main()

import sys

try:
    from lorakit.cli import main
except KeyboardInterrupt:  # Ctrl-C before main's own handler exists
    print("interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())

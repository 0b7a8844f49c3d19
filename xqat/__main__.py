import sys

from .cli import main, untrust_working_directory

untrust_working_directory()
sys.exit(main())

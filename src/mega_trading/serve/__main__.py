"""python -m mega_trading.serve docs/openapi.json: write the OpenAPI document."""

import sys

from mega_trading.serve.app import write_openapi

print(write_openapi(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi.json"))

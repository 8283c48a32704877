#!/usr/bin/env python3
"""A Modbus device for tests, served by pymodbus (a third-party implementation).

Usage:
  modbus_device.py tcp PORT COUNTS_FILE            one device (unit 1) on 127.0.0.1:PORT
  modbus_device.py rtu SERIAL_PATH COUNTS_FILE     units 1 and 2 on a serial line (RTU framing, 9600 8N1)

Every register is computed here with Python's struct module from the expected value and byte order (an
implementation independent of fieldlink's decoder). COUNTS_FILE is rewritten after every request with
{"requests": N, "by_function": {...}}. Addresses outside the defined blocks answer ILLEGAL DATA ADDRESS.

FIELDLINK_MODBUS_SLOW=EVERY:DELAY_MS makes every EVERY-th request to unit 1 answer DELAY_MS late (a unit that
sometimes answers after the client's timeout: on a serial line its late frame arrives while the next request
is under way).
"""
import os
import asyncio
import json
import struct
import sys

from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

ORDERS = {"ABCD": lambda b: b, "DCBA": lambda b: b[::-1],
          "BADC": lambda b: b"".join(b[i:i + 2][::-1] for i in range(0, len(b), 2)),
          "CDAB": lambda b: b"".join(b[i:i + 2] for i in reversed(range(0, len(b), 2)))}


def regs(fmt, value, order="ABCD"):
    b = ORDERS[order](struct.pack(">" + fmt, value))
    return [int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2)]


# address → registers; the Rust test expects exactly these values (see tests/tests/modbus.rs).
HOLDING = {
    0: regs("h", -200),
    1: regs("H", 65000),
    2: regs("i", -123456, "ABCD"),
    4: regs("I", 3000000000, "DCBA"),
    6: regs("f", 123.25, "BADC"),
    8: regs("f", -0.5, "CDAB"),
    10: regs("q", -5000000000000, "ABCD"),
    14: regs("Q", 18000000000000000000, "CDAB"),
    18: regs("d", 3.14159, "DCBA"),
    22: [int.from_bytes(b"PU", "big"), int.from_bytes(b"MP", "big"), int.from_bytes(b"-7", "big"), 0],
    26: [0b1010],
}
INPUT = {0: regs("f", 230.5), 2: regs("H", 1234)}
COILS = [True, False, True, True, False, False, False, True]
DISCRETE = [False, True, False, True]


def block(table):
    flat = []
    for addr in sorted(table):
        flat += table[addr]
    return [SimData(0, values=flat, datatype=DataType.REGISTERS)]


counts = {"requests": 0, "by_function": {}, "slowed": 0}
SLOW = [int(x) for x in os.environ.get("FIELDLINK_MODBUS_SLOW", "0:0").split(":")]
unit1_requests = [0]


def make_action(path, unit):
    async def action(function_code, start_address, address, count, current_registers, set_values):
        if unit == 1 and SLOW[0]:
            unit1_requests[0] += 1
            if unit1_requests[0] % SLOW[0] == 0:
                counts["slowed"] += 1
                await asyncio.sleep(SLOW[1] / 1000)
        counts["requests"] += 1
        key = str(function_code)
        counts["by_function"][key] = counts["by_function"].get(key, 0) + 1
        with open(path + ".tmp", "w") as f:
            json.dump(counts, f)
        os.replace(path + ".tmp", path)
        return None
    return action


def device(unit, path, offset=0):
    hr = {a: [(r + offset) & 0xFFFF for r in v] if a == 1 else v for a, v in HOLDING.items()}
    return SimDevice(
        unit,
        simdata=(
            [SimData(0, values=COILS, datatype=DataType.BITS)],
            [SimData(0, values=DISCRETE, datatype=DataType.BITS)],
            block(hr),
            block(INPUT),
        ),
        action=make_action(path, unit),
    )


async def main():
    mode, where, path = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "tcp":
        server = ModbusTcpServer(device(1, path), address=("127.0.0.1", int(where)))
    else:
        # Unit 2's u16 at address 1 reads 65001, so the two units are distinguishable.
        server = ModbusSerialServer([device(1, path), device(2, path, offset=1)], port=where, baudrate=9600)
    print("serving", flush=True)
    await server.serve_forever()


asyncio.run(main())

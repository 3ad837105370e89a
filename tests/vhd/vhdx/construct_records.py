"""The VHDX record layouts as ``construct`` declared them until vhd.vhdx.records moved to
``struct`` field tables (MS-VHDX 1.0, 2.2.1 file identifier, 2.2.2 header, 2.2.3 region table,
2.3.1 log entry header and descriptors, 2.6.1 metadata table, 2.6.2.1 file parameters,
2.6.2.6 parent locator).

Kept in the tests only, as a second, independently declared reading of the same layouts: the
round-trip tests in test_records.py build and parse every record both ways and compare bytes
and fields.  (Not imported by the library: construct costs every VHDX command its start-up.)
"""

from __future__ import annotations

import construct as cs

FILE_IDENTIFIER = cs.Struct("signature" / cs.Bytes(8), "creator" / cs.Bytes(512))

HEADER = cs.Struct(
    "signature" / cs.Const(b"head"),
    "checksum" / cs.Int32ul,
    "sequence_number" / cs.Int64ul,
    "file_write_guid" / cs.Bytes(16),
    "data_write_guid" / cs.Bytes(16),
    "log_guid" / cs.Bytes(16),
    "log_version" / cs.Int16ul,
    "version" / cs.Int16ul,
    "log_length" / cs.Int32ul,
    "log_offset" / cs.Int64ul,
)

REGION_TABLE_HEADER = cs.Struct(
    "signature" / cs.Const(b"regi"),
    "checksum" / cs.Int32ul,
    "entry_count" / cs.Int32ul,
    "reserved" / cs.Int32ul,
)
REGION_TABLE_ENTRY = cs.Struct(
    "guid" / cs.Bytes(16),
    "file_offset" / cs.Int64ul,
    "length" / cs.Int32ul,
    "required" / cs.Int32ul,
)

METADATA_TABLE_HEADER = cs.Struct(
    "signature" / cs.Const(b"metadata"),
    "reserved" / cs.Int16ul,
    "entry_count" / cs.Int16ul,
    "reserved2" / cs.Bytes(20),
)
METADATA_TABLE_ENTRY = cs.Struct(
    "item_id" / cs.Bytes(16),
    "offset" / cs.Int32ul,
    "length" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "reserved2" / cs.Int32ul,
)

FILE_PARAMETERS_STRUCT = cs.Struct("block_size" / cs.Int32ul, "flags" / cs.Int32ul)

PARENT_LOCATOR_HEADER = cs.Struct(
    "locator_type" / cs.Bytes(16), "reserved" / cs.Int16ul, "key_value_count" / cs.Int16ul
)
PARENT_LOCATOR_ENTRY = cs.Struct(
    "key_offset" / cs.Int32ul,
    "value_offset" / cs.Int32ul,
    "key_length" / cs.Int16ul,
    "value_length" / cs.Int16ul,
)

LOG_ENTRY_HEADER = cs.Struct(
    "signature" / cs.Const(b"loge"),
    "checksum" / cs.Int32ul,
    "entry_length" / cs.Int32ul,
    "tail" / cs.Int32ul,
    "sequence_number" / cs.Int64ul,
    "descriptor_count" / cs.Int32ul,
    "reserved" / cs.Int32ul,
    "log_guid" / cs.Bytes(16),
    "flushed_file_offset" / cs.Int64ul,
    "last_file_offset" / cs.Int64ul,
)
DESCRIPTOR = cs.Struct(
    "signature" / cs.Bytes(4),
    "trailing" / cs.Bytes(4),
    "leading" / cs.Bytes(8),
    "file_offset" / cs.Int64ul,
    "sequence_number" / cs.Int64ul,
)

# name in vhd.vhdx.records -> the construct declaration of the same record
ALL = {
    "FILE_IDENTIFIER": FILE_IDENTIFIER,
    "HEADER": HEADER,
    "REGION_TABLE_HEADER": REGION_TABLE_HEADER,
    "REGION_TABLE_ENTRY": REGION_TABLE_ENTRY,
    "METADATA_TABLE_HEADER": METADATA_TABLE_HEADER,
    "METADATA_TABLE_ENTRY": METADATA_TABLE_ENTRY,
    "FILE_PARAMETERS_STRUCT": FILE_PARAMETERS_STRUCT,
    "PARENT_LOCATOR_HEADER": PARENT_LOCATOR_HEADER,
    "PARENT_LOCATOR_ENTRY": PARENT_LOCATOR_ENTRY,
    "LOG_ENTRY_HEADER": LOG_ENTRY_HEADER,
    "DESCRIPTOR": DESCRIPTOR,
}

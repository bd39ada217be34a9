from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PayerRequest(_message.Message):
    __slots__ = ("payer",)
    PAYER_FIELD_NUMBER: _ClassVar[int]
    payer: str
    def __init__(self, payer: _Optional[str] = ...) -> None: ...

class RegisterPayerResponse(_message.Message):
    __slots__ = ("created", "status")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    created: bool
    status: str
    def __init__(self, created: _Optional[bool] = ..., status: _Optional[str] = ...) -> None: ...

class PayerStatus(_message.Message):
    __slots__ = ("payer", "status")
    PAYER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    payer: str
    status: str
    def __init__(self, payer: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class CreditRequest(_message.Message):
    __slots__ = ("payer", "asset", "amount", "idempotency_key")
    PAYER_FIELD_NUMBER: _ClassVar[int]
    ASSET_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    payer: str
    asset: str
    amount: str
    idempotency_key: str
    def __init__(self, payer: _Optional[str] = ..., asset: _Optional[str] = ..., amount: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CreditResponse(_message.Message):
    __slots__ = ("applied", "asset", "balance")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    ASSET_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    asset: str
    balance: str
    def __init__(self, applied: _Optional[bool] = ..., asset: _Optional[str] = ..., balance: _Optional[str] = ...) -> None: ...

class AssetBalance(_message.Message):
    __slots__ = ("asset", "balance", "channeled", "credited", "debited")
    ASSET_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    CHANNELED_FIELD_NUMBER: _ClassVar[int]
    CREDITED_FIELD_NUMBER: _ClassVar[int]
    DEBITED_FIELD_NUMBER: _ClassVar[int]
    asset: str
    balance: str
    channeled: str
    credited: str
    debited: str
    def __init__(self, asset: _Optional[str] = ..., balance: _Optional[str] = ..., channeled: _Optional[str] = ..., credited: _Optional[str] = ..., debited: _Optional[str] = ...) -> None: ...

class Balance(_message.Message):
    __slots__ = ("payer", "status", "assets")
    PAYER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ASSETS_FIELD_NUMBER: _ClassVar[int]
    payer: str
    status: str
    assets: _containers.RepeatedCompositeFieldContainer[AssetBalance]
    def __init__(self, payer: _Optional[str] = ..., status: _Optional[str] = ..., assets: _Optional[_Iterable[_Union[AssetBalance, _Mapping]]] = ...) -> None: ...

class ListReceiptsRequest(_message.Message):
    __slots__ = ("payer", "limit", "after")
    PAYER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    payer: str
    limit: int
    after: str
    def __init__(self, payer: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("stream_id", "receipt_id", "kind", "asset", "amount", "issued_at", "resource", "route", "channel_id", "signed_json")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ASSET_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNED_JSON_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    receipt_id: str
    kind: str
    asset: str
    amount: str
    issued_at: int
    resource: str
    route: str
    channel_id: str
    signed_json: str
    def __init__(self, stream_id: _Optional[str] = ..., receipt_id: _Optional[str] = ..., kind: _Optional[str] = ..., asset: _Optional[str] = ..., amount: _Optional[str] = ..., issued_at: _Optional[int] = ..., resource: _Optional[str] = ..., route: _Optional[str] = ..., channel_id: _Optional[str] = ..., signed_json: _Optional[str] = ...) -> None: ...

class ListReceiptsResponse(_message.Message):
    __slots__ = ("receipts", "next_after")
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    receipts: _containers.RepeatedCompositeFieldContainer[Receipt]
    next_after: str
    def __init__(self, receipts: _Optional[_Iterable[_Union[Receipt, _Mapping]]] = ..., next_after: _Optional[str] = ...) -> None: ...

class OpenChannelRequest(_message.Message):
    __slots__ = ("payer", "asset", "deposit", "ttl_seconds", "channel_id")
    PAYER_FIELD_NUMBER: _ClassVar[int]
    ASSET_FIELD_NUMBER: _ClassVar[int]
    DEPOSIT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    payer: str
    asset: str
    deposit: str
    ttl_seconds: int
    channel_id: str
    def __init__(self, payer: _Optional[str] = ..., asset: _Optional[str] = ..., deposit: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., channel_id: _Optional[str] = ...) -> None: ...

class ChannelRequest(_message.Message):
    __slots__ = ("payer", "channel_id")
    PAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    payer: str
    channel_id: str
    def __init__(self, payer: _Optional[str] = ..., channel_id: _Optional[str] = ...) -> None: ...

class Channel(_message.Message):
    __slots__ = ("channel_id", "payer", "payee", "asset", "deposit", "cumulative", "sequence", "status", "opened_at", "expires_at", "balance")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    PAYER_FIELD_NUMBER: _ClassVar[int]
    PAYEE_FIELD_NUMBER: _ClassVar[int]
    ASSET_FIELD_NUMBER: _ClassVar[int]
    DEPOSIT_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    payer: str
    payee: str
    asset: str
    deposit: str
    cumulative: str
    sequence: int
    status: str
    opened_at: int
    expires_at: int
    balance: str
    def __init__(self, channel_id: _Optional[str] = ..., payer: _Optional[str] = ..., payee: _Optional[str] = ..., asset: _Optional[str] = ..., deposit: _Optional[str] = ..., cumulative: _Optional[str] = ..., sequence: _Optional[int] = ..., status: _Optional[str] = ..., opened_at: _Optional[int] = ..., expires_at: _Optional[int] = ..., balance: _Optional[str] = ...) -> None: ...

class CloseChannelResponse(_message.Message):
    __slots__ = ("channel_id", "refund", "cumulative", "sequence", "balance", "receipt_id", "already_closed", "vouchers")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    REFUND_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_CLOSED_FIELD_NUMBER: _ClassVar[int]
    VOUCHERS_FIELD_NUMBER: _ClassVar[int]
    channel_id: str
    refund: str
    cumulative: str
    sequence: int
    balance: str
    receipt_id: str
    already_closed: bool
    vouchers: int
    def __init__(self, channel_id: _Optional[str] = ..., refund: _Optional[str] = ..., cumulative: _Optional[str] = ..., sequence: _Optional[int] = ..., balance: _Optional[str] = ..., receipt_id: _Optional[str] = ..., already_closed: _Optional[bool] = ..., vouchers: _Optional[int] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ("payer", "limit")
    PAYER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    payer: str
    limit: int
    def __init__(self, payer: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("batch_id", "payer", "seq", "count", "merkle_root", "closed_at", "totals", "committed", "manifest_json")
    class TotalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PAYER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MERKLE_ROOT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    payer: str
    seq: int
    count: int
    merkle_root: str
    closed_at: int
    totals: _containers.ScalarMap[str, str]
    committed: bool
    manifest_json: str
    def __init__(self, batch_id: _Optional[str] = ..., payer: _Optional[str] = ..., seq: _Optional[int] = ..., count: _Optional[int] = ..., merkle_root: _Optional[str] = ..., closed_at: _Optional[int] = ..., totals: _Optional[_Mapping[str, str]] = ..., committed: _Optional[bool] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[Batch]
    def __init__(self, batches: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ...) -> None: ...

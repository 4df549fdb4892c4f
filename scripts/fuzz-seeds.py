#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target (fuzz/corpus/<target>/seed-*) from the
vendor payloads in tests/fixtures/ and the configs in config/. Run from the repository
root; it replaces the seed-* files and leaves the files the fuzzer added alone."""

import base64
import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def fixture(path):
    with open(os.path.join(FIXTURES, path), "rb") as file:
        return file.read()


def compact(path):
    return json.dumps(json.loads(fixture(path)), separators=(",", ":")).encode()


def delivery(headers, body):
    head = "".join(f"{name}: {value}\n" for name, value in headers)
    return head.encode() + b"\n" + body


seeds = {}


def seed(target, name, data):
    seeds.setdefault(target, {})[name] = data


# signature: "<scheme> <now> <METHOD> <URI>", headers, empty line, body.
def vectors(vendor):
    return json.loads(fixture(f"{vendor}/signature-vectors.json"))["vectors"]


for at, v in enumerate(vectors("shopify")):
    seed("signature", f"shopify-{at}", b"shopify 1768986405 POST https://hooks.example/webhooks/shop\n"
         + delivery([("x-shopify-hmac-sha256", v["expected"]), ("x-shopify-webhook-id", f"wh-{at}"),
                     ("x-shopify-topic", "checkouts/create")], v["body"].encode()))
for at, v in enumerate(vectors("woocommerce")):
    seed("signature", f"woocommerce-{at}", b"woocommerce 1768986405 POST https://hooks.example/webhooks/woo\n"
         + delivery([("x-wc-webhook-signature", v["expected"]), ("x-wc-webhook-delivery-id", str(at + 1))],
                    v["body"].encode()))
seed("signature", "woocommerce-ping", b"woocommerce 1768986405 POST https://hooks.example/webhooks/woo\n\nwebhook_id=12")
for at, v in enumerate(vectors("stripe")):
    seed("signature", f"stripe-{at}", f"stripe {v['timestamp']} POST https://hooks.example/webhooks/stripe\n".encode()
         + delivery([("stripe-signature", v["header"])], v["payload"].encode()))
for at, v in enumerate(vectors("hubspot")):
    if v["version"] == "v3":
        now = int(v["timestamp"]) // 1000
        line = f"hubspot_v3 {now} {v['method']} {v['uri']}\n"
        headers = [("x-hubspot-signature-v3", v["expected"]), ("x-hubspot-request-timestamp", v["timestamp"])]
    else:
        uri = v["uri"] if v["uri"] else "https://hooks.example/webhooks/hubspot"
        line = f"hubspot_v1v2 1768986405 {v['method']} {uri}\n"
        headers = [("x-hubspot-signature", v["expected"]), ("x-hubspot-signature-version", v["version"])]
    seed("signature", f"hubspot-{at}", line.encode() + delivery(headers, v["body"].encode()))
seed("signature", "hubspot-v3-escaped-uri",
     b"hubspot_v3 1768912350 POST https://dealsync.example.com/hooks/hubspot%3Fconn%3Dhubspot-eu%2F\n"
     + delivery([("x-hubspot-signature-v3", "NTa/mmjPrUVrJ4PWwzS1hxhSw7WiXGaAuokoyRAeoDY="),
                 ("x-hubspot-request-timestamp", "1768912350000")], compact("hubspot/webhook-deal-propertychange.json")))
for at, v in enumerate(vectors("standard-webhooks")):
    signature = v.get("expected_header") or v["header"]
    seed("signature", f"standard-webhooks-{at}",
         f"standard_webhooks {v['webhook_timestamp']} POST https://hooks.example/webhooks/generic\n".encode()
         + delivery([("webhook-id", v["webhook_id"]), ("webhook-timestamp", v["webhook_timestamp"]),
                     ("webhook-signature", signature + " v1a,ignored")], v["payload"].encode()))
basic = base64.b64encode(b"hook-user:hook-password").decode()
seed("signature", "pipedrive", b"pipedrive_basic 1768986405 POST https://hooks.example/webhooks/pipedrive\n"
     + delivery([("authorization", f"Basic {basic}")], fixture("pipedrive/webhook-v2-deal-change.json")))
seed("signature", "none", b"none 0 POST https://hooks.example/\n\n{}")

# Webhook deliveries: headers as the vendor sends them, then the body.
for topic, path in [("checkouts/create", "shopify/webhook-checkouts-create.json"),
                    ("checkouts/update", "shopify/webhook-checkouts-create.json"),
                    ("orders/create", "shopify/webhook-orders-create.json"),
                    ("orders/paid", "shopify/order-get.json"),
                    ("orders/cancelled", "shopify/webhook-orders-create.json")]:
    name = topic.replace("/", "-") + "-" + os.path.basename(path).removesuffix(".json")
    seed("webhook_shopify", name, delivery([("x-shopify-topic", topic), ("x-shopify-webhook-id", "wh-1")], fixture(path)))
seed("webhook_shopify", "events-headers", delivery([("shopify-topic", "orders/create"), ("shopify-webhook-id", "wh-2")],
                                                   compact("shopify/webhook-orders-create.json")))
for topic, path in [("order.created", "woocommerce/order-retrieve.json"),
                    ("order.updated", "woocommerce/order-meta-data-consent.json"),
                    ("order.restored", "woocommerce/order-retrieve.json"),
                    ("order.deleted", "woocommerce/order-retrieve.json")]:
    name = topic.replace(".", "-") + "-" + os.path.basename(path).removesuffix(".json")
    seed("webhook_woocommerce", name, delivery([("x-wc-webhook-topic", topic), ("x-wc-webhook-resource", "order"),
                                                ("x-wc-webhook-delivery-id", "7")], fixture(path)))
seed("webhook_woocommerce", "resource-mismatch", delivery([("x-wc-webhook-topic", "order.updated"),
                                                           ("x-wc-webhook-resource", "product")],
                                                          compact("woocommerce/order-retrieve.json")))
for path in ["stripe/event-checkout-session-completed.json", "stripe/event-checkout-session-expired.json"]:
    seed("webhook_stripe", os.path.basename(path).removesuffix(".json"),
         delivery([("stripe-signature", "t=1768986405,v1=00")], fixture(path)))
for at, v in enumerate(vectors("stripe")):
    seed("webhook_stripe", f"vector-{at}", delivery([], v["payload"].encode()))
seed("webhook_hubspot", "deal-propertychange", delivery([("x-hubspot-signature-v3", "x"), ("x-hubspot-request-timestamp", "1")],
                                                        fixture("hubspot/webhook-deal-propertychange.json")))
for at, v in enumerate(vectors("hubspot")):
    if v["body"]:
        seed("webhook_hubspot", f"vector-{at}", delivery([], v["body"].encode()))
for path in ["pipedrive/webhook-v2-deal-change.json", "pipedrive/webhook-v2-deal-create.json",
             "pipedrive/webhook-v2-deal-delete.json"]:
    seed("webhook_pipedrive", os.path.basename(path).removesuffix(".json"),
         delivery([("authorization", f"Basic {basic}"), ("content-type", "application/json")], fixture(path)))
example = fixture("standard-webhooks/example-payload.json")
seed("webhook_generic", "example-payload", delivery([("webhook-id", "msg_1"), ("webhook-timestamp", "1614265330"),
                                                     ("webhook-signature", "v1,x")], example))
seed("webhook_generic", "cart", delivery([], json.dumps({
    "type": "cart.updated", "timestamp": "2026-01-20T10:00:00Z",
    "data": {"id": "cart-1", "stage": "abandoned", "title": "Cart 1", "amount": "379.69", "currency": "eur",
             "email": "ana@example.com", "name": "Ana", "recovery_url": "https://shop.example/r/1",
             "marketing_consent": True, "created_at": "2026-01-20T09:00:00Z",
             "updated_at": "2026-01-20T10:00:00Z", "cart_id": "ref-1"}}).encode()))
seed("webhook_generic", "deleted", delivery([], b'{"type":"cart.deleted","data":{"id":"cart-1"}}'))

# manifest_records: list pages (and other vendor answers) as the vendor sends them.
for path in sorted(glob.glob(os.path.join(FIXTURES, "*", "*.json"))):
    vendor = os.path.basename(os.path.dirname(path))
    if vendor in ("hubspot", "pipedrive", "salesforce"):
        name = vendor + "-" + os.path.basename(path).removesuffix(".json")
        with open(path, "rb") as file:
            seed("manifest_records", name, file.read())

# config: the shipped configs, and interpolation shapes.
for path in ["config/dealsync.example.toml", "config/demo.toml", *sorted(glob.glob(os.path.join(ROOT, "config", "examples", "*.toml")))]:
    with open(os.path.join(ROOT, path), "rb") as file:
        seed("config", os.path.basename(path).removesuffix(".toml"), file.read())
seed("config", "interpolation", b'[server]\napi_token = "${TOKEN}"\nlisten = "127.0.0.1:${PORT}"\n'
     b'public_url = "https://${EMPTY}x.example/$${literal}"\n[connections.a]\nconnector = "hubspot"\n'
     b'token = "${credential:hubspot}"\nwebhook_secret = ["${TOKEN}", "${MISSING}"]\n')
seed("config", "bad-duration", b'[connections.a]\nconnector = "hubspot"\ntoken = "${TOKEN}"\npoll_interval = "${TOKEN}"\n')

# money: a currency selector byte (index into CURRENCIES of src/fuzzing.rs), then text.
amounts = set()
for path in glob.glob(os.path.join(FIXTURES, "*", "*.json")):
    with open(path, encoding="utf-8") as file:
        text = file.read()
    amounts.update(re.findall(r'"(?:amount|total_price|subtotal_price|total|price|Amount|value|unit_amount|amount_total)"\s*:\s*"?(-?[0-9][0-9.eE+-]*)', text))
amounts.update(["0", "-0", "1e3", "1E-2", "0.005", "-0.005", "92233720368547758.07", "-92233720368547758.08",
                "9223372036854775807", " 12.50 ", "+7", ".5", "5.", "1e-400", "1e19"])
for at, amount in enumerate(sorted(amounts)):
    seed("money", f"{at:03}", bytes([at % 8]) + amount.encode())

for target, files in seeds.items():
    directory = os.path.join(CORPUS, target)
    os.makedirs(directory, exist_ok=True)
    for old in glob.glob(os.path.join(directory, "seed-*")):
        os.remove(old)
    for name, data in files.items():
        with open(os.path.join(directory, "seed-" + name), "wb") as file:
            file.write(data)
    print(f"{target}: {len(files)} seeds")

"""Access rules without a network: CIDR allow lists, per-export TLS and DN rules, QEMU's authz-list file
format, the DN string a certificate gives, and the [tls] / [[access]] configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagecore.errors import InvalidArgumentError
from nbdproto.constants import REP_ERR_POLICY, REP_ERR_TLS_REQD
from nbdsrv.access import AuthzList, Policy, glob_match
from nbdsrv.config import AccessRule, PoolConfig, ServerConfig, TLSConfig, load_toml
from nbdsrv.tls import dn_of


def test_glob_is_qemus_simple_glob() -> None:
    assert glob_match("CN=*.example.com,O=Example", "CN=a.b.example.com,O=Example")
    assert glob_match("CN=host?", "CN=host1")
    assert not glob_match("CN=host?", "CN=host12")
    assert not glob_match("CN=[ab]", "CN=a")  # brackets are literal, as in GLib's g_pattern_match_simple
    assert glob_match("CN=[ab]", "CN=[ab]")


def test_server_wide_allow_list() -> None:
    p = Policy(allow=["10.0.0.0/8", "::1/128", "192.0.2.7"])
    assert p.admits("10.1.2.3") and p.admits("::1") and p.admits("192.0.2.7")
    assert p.admits("::ffff:10.0.0.1")  # an IPv4 peer on a dual-stack socket
    assert not p.admits("192.0.2.8") and not p.admits("127.0.0.1")
    assert p.admits(None)  # unix sockets: their permissions decide
    assert Policy().admits("203.0.113.1")


def test_per_export_rules() -> None:
    rules = [AccessRule(exports=("local:100/*",), tls="require"),
             AccessRule(exports=("secret",), allow=("10.1.0.0/16",),
                        authz=("CN=backup,O=Example", "CN=*.vm"))]
    p = Policy(rules=rules)
    assert p.check("local:100/vm-100-disk-0.raw", addr="10.0.0.1", tls=False, dn=None) == (
        REP_ERR_TLS_REQD, "export 'local:100/vm-100-disk-0.raw' requires TLS")
    assert p.check("local:100/vm-100-disk-0.raw", addr="10.0.0.1", tls=True, dn=None) is None
    assert p.check("local:101/vm-101-disk-0.raw", addr="10.0.0.1", tls=False, dn=None) is None
    # an authz list implies TLS
    assert p.check("secret", addr="10.1.0.1", tls=False, dn=None)[0] == REP_ERR_TLS_REQD  # type: ignore[index]
    assert p.check("secret", addr="10.1.0.1", tls=True, dn="CN=backup,O=Example") is None
    assert p.check("secret", addr="10.1.0.1", tls=True, dn="CN=db.vm") is None
    refused = p.check("secret", addr="10.1.0.1", tls=True, dn="CN=backup,O=Other")
    assert refused is not None and refused[0] == REP_ERR_POLICY and "not authorized" in refused[1]
    refused = p.check("secret", addr="10.2.0.1", tls=True, dn="CN=backup,O=Example")
    assert refused is not None and refused[0] == REP_ERR_POLICY and "address" in refused[1]


def test_authz_list_file_is_qemus_format(tmp_path: Path) -> None:
    f = tmp_path / "authz.json"
    f.write_text(json.dumps({"rules": [
        {"match": "CN=fred,O=Example", "policy": "allow", "format": "exact"},
        {"match": "CN=dan,*", "policy": "deny", "format": "glob"},
        {"match": "CN=da*", "policy": "allow", "format": "glob"}], "policy": "deny"}))
    a = AuthzList.load(str(f))
    assert a.allows("CN=fred,O=Example") and not a.allows("CN=fred,O=Other")
    assert not a.allows("CN=dan,O=Example") and a.allows("CN=dave,O=Example")
    assert not a.allows(None)
    p = Policy(authz=a)
    assert p.check("any", addr=None, tls=False, dn=None)[0] == REP_ERR_TLS_REQD  # type: ignore[index]
    assert p.check("any", addr=None, tls=True, dn="CN=bob")[0] == REP_ERR_POLICY  # type: ignore[index]
    assert p.check("any", addr=None, tls=True, dn="CN=fred,O=Example") is None
    for bad in ({"rules": [{"match": "x"}]}, {"rules": [{"match": "x", "policy": "maybe"}]},
                {"rules": [{"match": "x", "policy": "allow", "format": "regex"}]}, {"policy": "deny", "x": 1},
                []):
        with pytest.raises(InvalidArgumentError):
            AuthzList.parse(bad)
    f.write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="authz file"):
        AuthzList.load(str(f))


def test_dn_is_gnutls_order_with_rfc4514_escapes() -> None:
    cert = {"subject": ((("countryName", "GB"),), (("stateOrProvinceName", "London"),),
                        (("organizationName", "Example, Ltd"),), (("commonName", "laptop.example.com"),))}
    assert dn_of(cert) == "CN=laptop.example.com,O=Example\\, Ltd,ST=London,C=GB"
    assert dn_of({}) is None


def test_toml_tls_and_access(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    cfg_file = tmp_path / "nbdsrv.toml"
    cfg_file.write_text('''
[server]
allow = ["10.0.0.0/8", "127.0.0.1"]
[tls]
mode = "on"
creds = "pki"
verify_peer = true
authz = "authz.json"
[[access]]
exports = ["local:100/*"]
tls = "require"
allow = ["10.1.0.0/16"]
authz = ["CN=backup"]
[pools.local]
path = "pool"
''')
    cfg = load_toml(str(cfg_file))
    cfg.validate()
    assert cfg.allow == ["10.0.0.0/8", "127.0.0.1"]
    assert cfg.tls == TLSConfig(mode="on", creds=str(tmp_path / "pki"), verify_peer=True,
                                authz=str(tmp_path / "authz.json"))
    assert cfg.access == [AccessRule(exports=("local:100/*",), tls="require", allow=("10.1.0.0/16",),
                                     authz=("CN=backup",))]


@pytest.mark.parametrize(("tls", "allow", "access", "message"), [
    (TLSConfig(mode="require"), [], [], "needs credentials"),
    (TLSConfig(mode="sometimes", creds="x"), [], [], "invalid TLS mode"),
    (TLSConfig(mode="off", creds="x"), [], [], "TLS is off"),
    (TLSConfig(creds="x", authz="a.json"), [], [], "needs --tls-verify-peer"),
    (TLSConfig(), ["10.0.0.0/33"], [], "invalid address range"),
    (TLSConfig(), [], [AccessRule(exports=("x",), tls="require")], "needs TLS"),
    (TLSConfig(creds="x"), [], [AccessRule(exports=("x",), authz=("CN=a",))], "needs verify_peer"),
    (TLSConfig(creds="x"), [], [AccessRule(exports=())], "at least one export"),
    (TLSConfig(creds="x"), [], [AccessRule(exports=("x",), tls="maybe")], "must be"),
])
def test_invalid_tls_configurations(tls: TLSConfig, allow: list[str], access: list[AccessRule],
                                    message: str) -> None:
    cfg = ServerConfig(pools=[PoolConfig("p", "/nonexistent")], tls=tls, allow=allow, access=access)
    with pytest.raises(InvalidArgumentError, match=message):
        cfg.validate()


def test_creds_alone_mean_require() -> None:
    assert TLSConfig(creds="x").effective_mode == "require"
    assert TLSConfig().effective_mode == "off"
    assert TLSConfig(mode="on", creds="x").effective_mode == "on"


def test_rules_in_qemus_certificate_order_match_too() -> None:
    """qemu-nbd (GnuTLS's gnutls_x509_crt_get_dn) matches rules against the DN in the certificate's own
    order; a rule written for it works here unchanged, as does one in RFC 4514 order."""
    cert = {"subject": ((("countryName", "GB"),), (("organizationName", "Example, Ltd"),),
                        (("commonName", "backup"),))}
    dn = dn_of(cert)
    assert dn == "CN=backup,O=Example\\, Ltd,C=GB"
    for match in ("C=GB,O=Example\\, Ltd,CN=backup", "CN=backup,O=Example\\, Ltd,C=GB"):
        a = AuthzList.parse({"rules": [{"match": match, "policy": "allow", "format": "exact"}],
                             "policy": "deny"})
        assert a.allows(dn), match
    a = AuthzList.parse({"rules": [{"match": "C=GB,*,CN=backup", "policy": "allow", "format": "glob"}],
                         "policy": "deny"})
    assert a.allows(dn) and not a.allows("CN=other,O=Example,C=GB")
    p = Policy(rules=[AccessRule(exports=("x",), authz=("C=GB,O=Example\\, Ltd,CN=backup",))])
    assert p.check("x", addr=None, tls=True, dn=dn) is None
    assert p.check("x", addr=None, tls=True, dn="CN=backup,O=Other,C=GB") is not None

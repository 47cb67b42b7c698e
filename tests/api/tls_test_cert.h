// Self-signed certificates for tests of https clients: an EC P-256 key and a certificate naming the
// given subjectAltNames ("DNS:localhost", "IP:127.0.0.1"), valid for an hour, usable as its own
// trust anchor (CA:TRUE). Written as PEM files for a TLS server and a client's CA file.
#pragma once

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cstdio>
#include <memory>
#include <string>

namespace arbiter::testing {

// Writes `cert_path` and `key_path`; false when OpenSSL failed.
inline bool make_self_signed_cert(const std::string& cert_path, const std::string& key_path, const std::string& subject_alt_names) {
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(EVP_EC_gen("P-256"), EVP_PKEY_free);
  std::unique_ptr<X509, decltype(&X509_free)> cert(X509_new(), X509_free);
  if (!key || !cert) return false;
  X509_set_version(cert.get(), 2);
  static long serial = 1;
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial++);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -60);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600);
  X509_set_pubkey(cert.get(), key.get());
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("arbiter test"), -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, cert.get(), cert.get(), nullptr, nullptr, 0);
  for (const auto& [nid, value] : {std::pair{NID_subject_alt_name, subject_alt_names}, std::pair{NID_basic_constraints, std::string("critical,CA:TRUE")},
                                   std::pair{NID_key_usage, std::string("critical,digitalSignature,keyCertSign")}}) {
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
    if (!ext) return false;
    X509_add_ext(cert.get(), ext, -1);
    X509_EXTENSION_free(ext);
  }
  if (X509_sign(cert.get(), key.get(), EVP_sha256()) == 0) return false;
  std::unique_ptr<FILE, decltype(&std::fclose)> c(std::fopen(cert_path.c_str(), "w"), std::fclose);
  std::unique_ptr<FILE, decltype(&std::fclose)> k(std::fopen(key_path.c_str(), "w"), std::fclose);
  if (!c || !k) return false;
  return PEM_write_X509(c.get(), cert.get()) == 1 && PEM_write_PrivateKey(k.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) == 1;
}

}  // namespace arbiter::testing

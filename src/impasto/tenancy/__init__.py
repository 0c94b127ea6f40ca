"""Tenancy: managed API keys, their limits, failed-authentication throttling and usage.

keys       ApiKey, Principal, the KeyStore and UsageLedger seams
directory  KeyDirectory: who a presented key is (operator keys from settings, managed keys)
limits     token buckets and concurrency slots (RateLimiter seam, in-memory implementation)
quotas     QuotaGate: a principal's limits applied to one task
sqlite_store / redis_store / redis_limits   the embedded and distributed implementations
"""

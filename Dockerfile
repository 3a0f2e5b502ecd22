# ssmtpd in a container, configured by SSMTPD_* environment variables only
# (docs/deploying.md "Deploying").  Build and run:
#     docker build -t ssmtpd .
#     docker run -p 587:8025 -v ssmtpd:/var/lib/ssmtpd \
#         -e SSMTPD_HOSTNAME=mail.example.org \
#         -e SSMTPD_SSL_CERT=/certs/fullchain.pem -e SSMTPD_SSL_KEY=/certs/privkey.pem \
#         -v /etc/letsencrypt/live/mail.example.org:/certs:ro ssmtpd
#     docker exec -it CONTAINER ssmtpd-auth-users --users /var/lib/ssmtpd/users add alice
FROM python:3.11-slim

RUN useradd --system --create-home --home-dir /var/lib/ssmtpd ssmtpd
COPY . /src
RUN pip install --no-cache-dir /src && rm -rf /src

# The defaults: the example programs, state under /var/lib/ssmtpd (a volume).
# Every option has its SSMTPD_* variable; override any of them with -e.
ENV SSMTPD_PORT=8025 \
    SSMTPD_SMTPS_PORT=8465 \
    SSMTPD_AUTH="ssmtpd-auth-users --users /var/lib/ssmtpd/users" \
    SSMTPD_PROCESS="ssmtpd-deliver-maildir /var/lib/ssmtpd/mail" \
    SSMTPD_SPOOL_DIR=/var/lib/ssmtpd \
    PYTHONUNBUFFERED=1

USER ssmtpd
WORKDIR /var/lib/ssmtpd
VOLUME /var/lib/ssmtpd
EXPOSE 8025 8465

# Healthy means every port answers SMTP: a greeting, then EHLO.  The check
# reads the same SSMTPD_* variables as the server; with --proxy-protocol it
# speaks from a --proxy-trusted address of the container's own, after a PROXY
# LOCAL header (docs/deploying.md "In a container").
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s \
    CMD ["python", "-m", "ssmtpd.healthcheck"]

# SIGTERM (docker stop) drains as under supervisord; give it the time to:
#     docker stop --time 360 CONTAINER
STOPSIGNAL SIGTERM
CMD ["ssmtpd"]
